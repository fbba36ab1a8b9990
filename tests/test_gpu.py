"""On a CUDA GPU: mixed precision, cached and compiled decoding, a compiled bf16 training run,
resume, and torchrun over NCCL. `python -m pytest -m gpu`; every test skips without CUDA.

What is not bit-identical on a GPU: cuBLAS and cuDNN pick kernels per shape and may sum in
another order, so bf16 and fp32 agree within bf16's rounding (tested below), and greedy
tokens equal transformers' in fp32 (in bf16 a near-tie can go the other way). A resumed run
repeats the uninterrupted one exactly without compile (tested); with compile, autotuning may
choose other kernels in the second process, so it is not claimed.
"""

import pytest
import torch

import train
from gpt import GPT, GPTConfig
from gpt.sampling import generate

from test_train import args, run_cli, step_losses, weights

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CUDA = ["--system.device=cuda"]


@pytest.fixture
def data_dir(char_data):
    return char_data


def test_bf16_autocast_forward_and_backward_stay_within_bf16_rounding_of_fp32():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=256, n_layer=2, n_head=4, n_embd=128)).cuda()
    x = torch.randint(0, 256, (4, 64), device="cuda")
    losses, grads = [], []
    for dtype in (torch.float32, torch.bfloat16):
        model.zero_grad()
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            loss = model(x, x)[1]
        loss.backward()
        losses.append(loss.float())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert losses[0].item() == pytest.approx(losses[1].item(), rel=1e-2)
    assert (grads[0] - grads[1]).norm() < 0.05 * grads[0].norm()  # bf16 keeps 8 bits of mantissa


def test_cached_and_compiled_decoding_equal_a_full_forward_and_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    from gpt.hf import from_pretrained

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=64, vocab_size=211,
                                     initializer_range=0.1, eos_token_id=210, bos_token_id=210)
    hf = transformers.GPT2LMHeadModel(config).eval().cuda()
    hf.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path).eval().cuda()
    prompt = torch.tensor([[17, 3, 99, 42]], device="cuda")
    expected = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, pad_token_id=210,
                           max_new_tokens=20)[0].tolist()
    tokens = prompt[0].tolist()
    for _ in range(20):  # no cache: a full forward for every token
        tokens.append(int(ours.logits(ours.hidden_states(torch.tensor([tokens], device="cuda")))[0, -1].argmax()))
    assert tokens == expected
    for compile in (False, True):
        assert generate(ours, prompt, 20, temperature=0, compile=compile)[0].tolist() == expected, compile


def test_a_compiled_bf16_run_with_fused_adamw_learns_and_resumes(data_dir, tmp_path):
    fast = [*CUDA, "--system.dtype=bfloat16", "--system.compile=true"]
    train.main(args(data_dir, tmp_path / "compiled", "--max_iters=30", *fast))
    losses = step_losses(tmp_path / "compiled")
    assert losses[30] < losses[1] - 0.5
    plain = [*CUDA, "--system.dtype=bfloat16", "--system.compile=false", "--model.dropout=0.1"]
    train.main(args(data_dir, tmp_path / "whole", "--max_iters=12", *plain))
    train.main(args(data_dir, tmp_path / "parts", "--max_iters=5", *plain))
    train.main(args(data_dir, tmp_path / "parts", "--max_iters=12", "--resume", *plain))
    assert step_losses(tmp_path / "whole") == step_losses(tmp_path / "parts")
    for name, tensor in weights(tmp_path / "whole").items():
        assert torch.equal(tensor, weights(tmp_path / "parts")[name]), name


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_torchrun_on_one_gpu_through_nccl(data_dir, tmp_path, engine):
    one = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "train.py"]
    run = run_cli(*one, *args(data_dir, tmp_path / engine, "--max_iters=6", f"--system.parallel={engine}", *CUDA))
    assert run.returncode == 0, run.stderr[-4000:]
    run = run_cli(*one, *args(data_dir, tmp_path / engine, "--max_iters=10", f"--system.parallel={engine}", *CUDA,
                              "--resume"))
    assert run.returncode == 0, run.stderr[-4000:]
    assert sorted(step_losses(tmp_path / engine)) == list(range(1, 11))
    assert "Guessing device ID" not in run.stderr and "using the device under current context" not in run.stderr
