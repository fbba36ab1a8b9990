"""gpt/parallel.py: FSDP equals DDP equals one process, activation checkpointing changes memory
and not results, FSDP runs resume exactly and with another engine or number of processes."""

import pytest
import torch

import sample
from gpt import GPT, GPTConfig
from gpt.checkpoint import load_checkpoint

from test_train import args, run_cli, step_losses, weights

TWO = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py"]
FSDP = "--system.parallel=fsdp"
# accumulation (1 process: 4 micro-steps; 2 processes: 2) and clipping that bites (norms are ~1-4)
STEPS = ["--batch.tokens_per_step=512", "--optim.grad_clip=0.5"]


@pytest.fixture
def data_dir(char_data):
    return char_data


def train_cli(*argv, procs=1):
    run = run_cli(*(TWO if procs == 2 else ["train.py"]), *argv, env={"OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, f"exit {run.returncode}\n{run.stdout[-2000:]}\n{run.stderr[-6000:]}"
    return run


def assert_same_run(a, b, atol):
    la, lb = step_losses(a), step_losses(b)
    assert la.keys() == lb.keys() and la
    for it in la:
        assert la[it] == pytest.approx(lb[it], abs=atol), it
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=atol)


@pytest.mark.slow
def test_fsdp_equals_ddp_equals_one_process_with_accumulation_and_clipping(data_dir, tmp_path):
    one = train_cli(*args(data_dir, tmp_path / "one", "--max_iters=6", *STEPS))
    ddp = train_cli(*args(data_dir, tmp_path / "ddp", "--max_iters=6", *STEPS), procs=2)
    fsdp = train_cli(*args(data_dir, tmp_path / "fsdp", "--max_iters=6", *STEPS, FSDP), procs=2)
    assert "4 accumulation x 1" in one.stdout and "2 accumulation x 2" in fsdp.stdout
    assert "(ddp)" in ddp.stdout and "(fsdp)" in fsdp.stdout
    assert_same_run(tmp_path / "one", tmp_path / "ddp", atol=1e-5)
    assert_same_run(tmp_path / "one", tmp_path / "fsdp", atol=1e-5)
    single = train_cli(*args(data_dir, tmp_path / "single", "--max_iters=6", *STEPS, FSDP))  # FSDP, one process
    assert_same_run(tmp_path / "one", tmp_path / "single", atol=1e-5)


@pytest.mark.slow
def test_fsdp_resumes_exactly_and_on_one_process(data_dir, tmp_path, capsys):
    dropout = "--model.dropout=0.1"
    train_cli(*args(data_dir, tmp_path / "whole", "--max_iters=10", *STEPS, FSDP, dropout), procs=2)
    train_cli(*args(data_dir, tmp_path / "parts", "--max_iters=4", *STEPS, FSDP, dropout), procs=2)
    train_cli(*args(data_dir, tmp_path / "parts", "--max_iters=10", *STEPS, FSDP, dropout, "--resume"), procs=2)
    assert step_losses(tmp_path / "whole") == step_losses(tmp_path / "parts")  # bit for bit
    for name, tensor in weights(tmp_path / "whole").items():
        assert torch.equal(tensor, weights(tmp_path / "parts")[name]), name
    # the checkpoint holds whole tensors: one process (DDP's path) continues it, and sample.py reads it
    run = train_cli(*args(data_dir, tmp_path / "parts", "--max_iters=12", *STEPS, "--resume"))
    assert "written by 2 process(es), this run has 1" in run.stdout
    assert load_checkpoint(tmp_path / "parts" / "ckpt.pt")["iter"] == 12 and max(step_losses(tmp_path / "parts")) == 12
    sample.main([f"--out_dir={tmp_path / 'parts'}", "--prompt=ROMEO:", "--max_new_tokens=20", "--no-stream"])
    assert capsys.readouterr().out.startswith("ROMEO:")


def saved_bytes(model, idx):
    """Loss, gradients, and the bytes autograd keeps for backward during the forward pass."""
    kept = []

    def pack(t):
        kept.append(t.numel() * t.element_size())
        return t

    model.zero_grad()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        torch.manual_seed(3)  # dropout
        _, loss = model(idx, idx)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}, sum(kept)


def test_activation_checkpointing_changes_memory_not_results():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=97, n_layer=4, n_head=4, n_embd=64, dropout=0.1)).train()
    idx = torch.randint(0, 97, (4, 64), generator=torch.Generator().manual_seed(1))
    loss, grads, kept = saved_bytes(model, idx)
    model.checkpoint_blocks = True
    loss_ckpt, grads_ckpt, kept_ckpt = saved_bytes(model, idx)
    assert loss_ckpt == pytest.approx(loss, abs=1e-6)
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=0, atol=1e-6)
    assert kept_ckpt < kept / 3  # only each block's input, not its insides


@pytest.mark.slow
def test_activation_checkpointing_in_training_gives_the_same_run(data_dir, tmp_path):
    train_cli(*args(data_dir, tmp_path / "plain", "--max_iters=4", "--model.dropout=0.1"))
    run = train_cli(*args(data_dir, tmp_path / "ckpt", "--max_iters=4", "--model.dropout=0.1",
                          "--system.activation_checkpointing=blocks"))
    assert "(activation checkpointing)" in run.stdout
    assert_same_run(tmp_path / "plain", tmp_path / "ckpt", atol=1e-6)


def test_fsdp_shards_every_block_in_place_and_keeps_the_names():
    from gpt.config import SystemConfig
    from gpt.parallel import is_sharded, model_state, parallelize
    from gpt.system import Processes

    config = GPTConfig(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=32)
    torch.manual_seed(0)
    model, reference = GPT(config), GPT(config)
    reference.load_state_dict(model.state_dict())
    system = SystemConfig(parallel="fsdp", compile=False)
    try:
        out = parallelize(model, Processes(), torch.device("cpu"), system, torch.float32)  # a group of one
        assert out is model and is_sharded(model) and all(is_sharded(block) for block in model.transformer.h)
        assert all(type(p).__name__ == "DTensor" for p in model.parameters())
        assert [n for n, _ in model.named_parameters()] == [n for n, _ in reference.named_parameters()]
        whole = model_state(model)
        assert whole.keys() == reference.state_dict().keys()
        assert all(torch.equal(whole[k], v) for k, v in reference.state_dict().items())
        idx = torch.randint(0, 50, (2, 16))
        torch.testing.assert_close(model(idx)[0], reference(idx)[0])
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_fsdp_fine_tunes_a_classifier_like_ddp(tmp_path):
    from test_classify import args as classify_args, evals, sms_slice

    data = sms_slice(tmp_path, 220)  # a validation split that the two processes share unevenly
    more = ["--max_iters=8", "--eval.eval_interval=4", "--optim.grad_clip=0.5"]
    train_cli(*classify_args(data, tmp_path / "ddp", *more), procs=2)
    train_cli(*classify_args(data, tmp_path / "fsdp", *more, FSDP), procs=2)
    assert_same_run(tmp_path / "ddp", tmp_path / "fsdp", atol=1e-5)
    for a, b in zip(evals(tmp_path / "ddp"), evals(tmp_path / "fsdp"), strict=True):
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-5) and a["accuracy"] == b["accuracy"]
