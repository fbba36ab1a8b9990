"""gpt/parallel.py: FSDP equals DDP equals one process, activation checkpointing changes memory
and not results, FSDP runs resume exactly and with another engine or number of processes."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import sample
from gpt import GPT, GPTConfig
from gpt.checkpoint import load_checkpoint, load_weights, network_from_checkpoint

from conftest import ROOT
from test_train import args, run_cli, step_losses

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


def weights(out_dir):
    """The latest checkpoint's weights, whole tensors, whether written whole or in shards."""
    ckpt = load_checkpoint(out_dir / "ckpt.pt")
    model = network_from_checkpoint(ckpt)
    load_weights(model, ckpt, out_dir / "ckpt.pt")
    return model.state_dict()


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
    train_cli(*args(data_dir, tmp_path / "single", "--max_iters=6", *STEPS, FSDP))  # FSDP, one process
    assert_same_run(tmp_path / "one", tmp_path / "single", atol=1e-5)


@pytest.mark.slow
def test_fsdp_with_architecture_switches_and_activation_checkpointing_resumes_a_ddp_run(data_dir, tmp_path):
    switches = ["--model.position=alibi", "--model.n_kv_head=1", "--model.norm=rmsnorm"]
    train_cli(*args(data_dir, tmp_path / "one", "--max_iters=6", *STEPS, *switches))
    run = train_cli(*args(data_dir, tmp_path / "fsdp", "--max_iters=6", *STEPS, *switches, FSDP,
                          "--system.activation_checkpointing=blocks"), procs=2)
    assert "(fsdp, activation checkpointing)" in run.stdout
    assert_same_run(tmp_path / "one", tmp_path / "fsdp", atol=1e-5)
    # a whole-tensor (one process) checkpoint continues under 2-process FSDP
    train_cli(*args(data_dir, tmp_path / "one", "--max_iters=8", *STEPS, *switches, FSDP, "--resume"), procs=2)
    assert load_checkpoint(tmp_path / "one" / "ckpt.pt")["shards"] == "ckpt-0000008.shards"


@pytest.mark.slow
def test_an_fsdp_checkpoint_before_the_first_step_resumes_like_an_unbroken_run(data_dir, tmp_path):
    train_cli(*args(data_dir, tmp_path / "whole", "--max_iters=3", *STEPS, FSDP))
    train_cli(*args(data_dir, tmp_path / "parts", "--max_iters=0", *STEPS, FSDP))
    assert load_checkpoint(tmp_path / "parts" / "ckpt.pt")["shards_hold_optimizer"] is False
    train_cli(*args(data_dir, tmp_path / "parts", "--max_iters=3", *STEPS, FSDP, "--resume"))
    assert step_losses(tmp_path / "whole") == step_losses(tmp_path / "parts")
    for name, tensor in weights(tmp_path / "whole").items():
        assert torch.equal(tensor, weights(tmp_path / "parts")[name]), name


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


@pytest.mark.slow
def test_sharded_checkpoints_rotate_and_consolidate_into_one_file(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    train_cli(*args(data_dir, out, "--max_iters=12", *STEPS, FSDP, "--run.keep_last=1"), procs=2)
    ckpt = load_checkpoint(out / "ckpt.pt")
    assert "model" not in ckpt and "optimizer" not in ckpt and ckpt["shards"] == "ckpt-0000012.shards"
    assert ckpt["format_version"] == 2  # code that only knows whole-tensor checkpoints refuses it clearly
    pieces = sorted(p.name for p in (out / "ckpt-0000012.shards").iterdir())
    assert pieces == [".metadata", "__0_0.distcp", "__1_0.distcp"]  # one file per process
    best = load_checkpoint(out / "best.pt")["shards"]
    assert sorted(p.name for p in out.glob("*.shards")) == sorted({"ckpt-0000012.shards", best})  # rotated
    assert not list(out.glob(".*tmp*"))
    run = run_cli("-m", "gpt.checkpoint", "consolidate", str(out / "ckpt.pt"), f"--out={tmp_path / 'whole.pt'}")
    assert run.returncode == 0, run.stderr
    whole = load_checkpoint(tmp_path / "whole.pt")
    assert whole["iter"] == 12 and "shards" not in whole and whole["optimizer"]["state"] and whole["format_version"] == 1
    expected = weights(out)  # read from the shards
    assert whole["model"].keys() == expected.keys()
    assert all(torch.equal(whole["model"][k], v) for k, v in expected.items())
    sample.main([f"--out_dir={tmp_path}", "--ckpt=whole.pt", "--prompt=ROMEO:", "--max_new_tokens=10", "--no-stream"])
    assert capsys.readouterr().out.startswith("ROMEO:")
    again = run_cli("-m", "gpt.checkpoint", "consolidate", str(tmp_path / "whole.pt"))
    assert again.returncode == 2 and "holds whole tensors already" in again.stderr
    # the consolidated file resumes like any checkpoint, here on one process
    (tmp_path / "from_whole").mkdir()
    (tmp_path / "whole.pt").rename(tmp_path / "from_whole" / "ckpt.pt")
    train_cli(*args(data_dir, tmp_path / "from_whole", "--max_iters=14", *STEPS, "--resume"))
    assert load_checkpoint(tmp_path / "from_whole" / "ckpt.pt")["iter"] == 14


def descendants(pid: int) -> list[int]:
    """Every process started by pid, however deep (Linux /proc)."""
    found = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        for child in map(int, children.read_text().split()):
            found += [child, *descendants(child)]
    return found


@pytest.mark.slow
def test_killing_every_process_while_shards_are_written_leaves_a_loadable_checkpoint(data_dir, tmp_path):
    from gpt.checkpoint import load_model

    out = tmp_path / "run"
    run = args(data_dir, out, FSDP, "--eval.eval_interval=1", "--eval.eval_iters=1", "--model.n_embd=128",
               "--model.n_layer=4")  # a checkpoint every step: a kill lands in or near a write

    def saved_iter():
        return load_checkpoint(out / "ckpt.pt")["iter"] if (out / "ckpt.pt").exists() else 0

    for attempt, delay in enumerate((0.0, 0.3, 0.7)):
        before = saved_iter()
        proc = subprocess.Popen([sys.executable, *TWO, *run, "--max_iters=100000", *(["--resume"] if attempt else [])],
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        deadline = time.time() + 120
        while saved_iter() <= before:
            assert time.time() < deadline and proc.poll() is None
            time.sleep(0.05)
        time.sleep(delay)
        for pid in [proc.pid, *descendants(proc.pid)]:  # torchrun and both training processes at once
            os.kill(pid, signal.SIGKILL)
        proc.wait()
        model, _, ckpt = load_model(out / "ckpt.pt")  # loads: its shards are complete
        assert ckpt["iter"] > before
    final = saved_iter()
    train_cli(*run, f"--max_iters={final + 2}", "--resume", procs=2)
    assert saved_iter() == final + 2


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


def test_ddp_gradients_are_views_into_its_buckets_not_a_second_copy():
    from gpt.config import SystemConfig
    from gpt.parallel import parallelize
    from gpt.system import Processes

    config = GPTConfig(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=32)
    torch.manual_seed(0)
    model = GPT(config)
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:  # DDP works on a group of one; Processes says two so that parallelize wraps the model
        ddp = parallelize(model, Processes(world_size=2), torch.device("cpu"), SystemConfig(compile=False),
                          torch.float32)
        assert type(ddp).__name__ == "DistributedDataParallel"
        idx = torch.randint(0, 50, (2, 16))
        for _ in range(2):  # the second step after zero_grad(set_to_none=True), as the Trainer does
            model.zero_grad(set_to_none=True)
            ddp(idx, targets=idx)[1].backward()
            grads = [p.grad for p in model.parameters()]
            storages = {g.untyped_storage().data_ptr(): g.untyped_storage().nbytes() for g in grads}
            assert len(storages) < len(grads)  # the gradients share DDP's few bucket storages
            # and those buckets are all the gradient memory there is: 4 bytes per parameter
            assert sum(storages.values()) == 4 * sum(p.numel() for p in model.parameters())
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("arch", [{}, dict(block="gau"), dict(attention="linear"), dict(attention="synthesizer_random_fixed")],
                         ids=["gpt2", "gau", "linear", "synth-fixed"])
def test_fsdp_shards_every_block_in_place_and_keeps_the_names(arch):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from gpt.config import SystemConfig
    from gpt.parallel import is_sharded, parallelize, sharded_state
    from gpt.system import Processes

    config = GPTConfig(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=32, **arch)
    torch.manual_seed(0)
    model, reference = GPT(config), GPT(config)
    reference.load_state_dict(model.state_dict())
    system = SystemConfig(parallel="fsdp", compile=False)
    try:
        out = parallelize(model, Processes(), torch.device("cpu"), system, torch.float32)  # a group of one
        assert out is model and is_sharded(model) and all(is_sharded(block) for block in model.transformer.h)
        assert all(type(p).__name__ == "DTensor" for p in model.parameters())
        assert [n for n, _ in model.named_parameters()] == [n for n, _ in reference.named_parameters()]
        parameters = dict(reference.named_parameters())  # (a fixed Synthesizer's buffer is not sharded)
        assert all(type(t).__name__ == "DTensor" for k, t in sharded_state(model)["model"].items() if k in parameters)
        whole = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
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


@pytest.mark.slow
def test_fsdp_in_bfloat16_stays_within_bf16_rounding_of_ddp(data_dir, tmp_path):
    # FSDP gathers bf16 weights, so the embeddings and the residual stream between blocks are bf16;
    # DDP's autocast keeps weights and the residual stream fp32. Not equal, then (the README says
    # so: this fails if they become equal), but close: measured 2.7e-4 (loss), 0.0094 (weights)
    bf16 = ["--max_iters=12", "--system.dtype=bfloat16", *STEPS]
    train_cli(*args(data_dir, tmp_path / "ddp", *bf16), procs=2)
    train_cli(*args(data_dir, tmp_path / "fsdp", *bf16, FSDP), procs=2)
    ddp, fsdp = step_losses(tmp_path / "ddp"), step_losses(tmp_path / "fsdp")
    gaps = [abs(ddp[it] - fsdp[it]) for it in ddp]
    assert 0 < max(gaps) < 1e-3
    wa, wb = weights(tmp_path / "ddp"), weights(tmp_path / "fsdp")
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=0.02)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_train_like_two_processes_on_one_node_and_resume_on_one(data_dir, tmp_path):
    """The README's multi-node command on one machine: two torchrun agents as two "nodes" of one
    process each, meeting at a c10d rendezvous on 127.0.0.1 (gloo), give the losses and weights of
    two processes on one node; their checkpoint then resumes on one node like a run never stopped."""
    more = ["--max_iters=6", *STEPS]
    train_cli(*args(data_dir, tmp_path / "one_node", *more, "--max_iters=8"), procs=2)
    port = free_port()
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", f"--node_rank={rank}",
         "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "train.py",
         *args(data_dir, tmp_path / "two_nodes", *more)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"}) for rank in (0, 1)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    for node, (out, err) in zip(nodes, outputs):
        assert node.returncode == 0, f"{out[-2000:]}\n{err[-4000:]}"
    # one main process, and a world of two processes over the two nodes
    assert [out.count("tokens per step (4 x 32 x 2 accumulation x 2)") for out, _ in outputs] in ([1, 0], [0, 1])
    one, two = step_losses(tmp_path / "one_node"), step_losses(tmp_path / "two_nodes")
    assert list(two) == list(range(1, 7))
    for it in two:
        assert two[it] == pytest.approx(one[it], abs=1e-5), it
    # resumed on one node (two processes): steps 7 and 8 and the final weights of the unbroken run
    train_cli("--resume", f"--run.out_dir={tmp_path / 'two_nodes'}", "--max_iters=8", procs=2)
    assert_same_run(tmp_path / "one_node", tmp_path / "two_nodes", atol=1e-5)
