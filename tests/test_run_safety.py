"""Nothing lost, nothing half-written: a run's directory survives mistakes, kills and damage,
and a resumed run continues the run it resumes (its own settings, its exact trajectory)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import train
from gpt.atomic import DirectoryLock
from gpt.checkpoint import load_checkpoint

from conftest import ROOT, fails_with, last_wins

TINY = ["--model.n_layer=2", "--model.n_head=2", "--model.n_embd=32", "--model.block_size=32", "--model.vocab_multiple=1",
        "--batch.batch_size=4", "--optim.lr=3e-3", "--optim.warmup_iters=2", "--optim.decay_iters=12",
        "--eval.eval_interval=4", "--eval.eval_iters=2", "--log.log_interval=1", "--log.plot=false", "--run.seed=5"]


def args(data_dir, out_dir, *more):
    return last_wins([f"--data.dir={data_dir}", f"--run.out_dir={out_dir}", *TINY, *more])


def records(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def step_losses(out_dir):
    return {r["iter"]: r["loss"] for r in records(out_dir) if "loss" in r}


def test_overwrite_removes_nothing_until_the_new_run_has_set_up(char_data, tmp_path, capsys):
    out = tmp_path / "run"
    train.main(args(char_data, out, "--max_iters=4"))
    fails_with(capsys, args(tmp_path / "no_data", out, "--max_iters=4", "--overwrite"), "has no meta.json")
    assert load_checkpoint(out / "best.pt")["iter"] == 4 and (out / "ckpt-0000004.pt").exists()


def test_resume_uses_the_runs_own_settings_and_may_extend_it(char_data, tmp_path, capsys):
    out = tmp_path / "run"
    config = tmp_path / "c.toml"
    config.write_text(f'[data]\ndir = "{char_data}"\n[optim]\nlr = 4e-3\n')
    train.main([str(config), *args(char_data, out, "--max_iters=4", "--optim.lr=1e-3")])
    train.main([str(config), "--resume", f"--run.out_dir={out}", "--max_iters=6"])
    printed = capsys.readouterr().out
    assert "note: resuming with run.max_iters = 6 (was 4)" in printed
    assert "c.toml differs in optim.lr (ignored)" in printed
    ckpt = load_checkpoint(out / "ckpt.pt")
    assert ckpt["iter"] == 6 and ckpt["config"]["optim"]["lr"] == 1e-3  # the run's lr, not the file's
    assert max(r["lr"] for r in records(out)) <= 1e-3


def test_a_torn_last_metrics_line_is_dropped_on_resume(char_data, tmp_path, capsys):
    out = tmp_path / "run"
    train.main(args(char_data, out, "--max_iters=4"))
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"iter": 5, "loss": 1.2')  # killed in the middle of a line
    train.main(args(char_data, out, "--max_iters=6", "--resume"))
    assert "dropped 1 damaged line(s)" in capsys.readouterr().out
    assert [r["iter"] for r in records(out) if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_resume_without_ckpt_pt_uses_the_newest_numbered_checkpoint(char_data, tmp_path, capsys):
    train.main(args(char_data, tmp_path / "whole", "--max_iters=8"))
    out = tmp_path / "parts"
    train.main(args(char_data, out, "--max_iters=8", "--run.keep_last=2"))
    (out / "ckpt.pt").unlink()
    (out / "ckpt-0000008.pt").unlink()  # ckpt-0000004.pt and best.pt remain
    train.main(args(char_data, out, "--max_iters=8", "--resume"))
    assert "resuming from ckpt-0000004.pt, its newest checkpoint" in capsys.readouterr().out
    assert step_losses(out) == step_losses(tmp_path / "whole")


def test_resuming_a_finished_run_adds_no_record(char_data, tmp_path, capsys):
    out = tmp_path / "run"
    train.main(args(char_data, out, "--max_iters=4"))
    before = {name: (out / name).read_bytes() for name in ("metrics.jsonl", "config.toml", "ckpt.pt")}
    train.main(args(char_data, out, "--max_iters=4", "--resume"))
    assert "already finished at iteration 4" in capsys.readouterr().out
    assert {name: (out / name).read_bytes() for name in before} == before  # left exactly as it was


def _stop_during(char_data, out, more, when, delay=0.0):
    """Run train.py and send SIGTERM `delay` seconds after stdout shows `when`; returns its stdout."""
    proc = subprocess.Popen([sys.executable, "train.py", *args(char_data, out, *more)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith(when):
            time.sleep(delay)
            proc.send_signal(signal.SIGTERM)
            break
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    return stdout


@pytest.mark.slow
def test_sigterm_during_a_long_evaluation_stops_after_the_batch(char_data, tmp_path):
    out = tmp_path / "run"
    stdout = _stop_during(char_data, out, ["--max_iters=8", "--eval.eval_iters=100000"], "iter 4:",
                          delay=1.0)  # well inside an evaluation of 100,000 batches
    assert "SIGTERM: stopping after this evaluation batch" in stdout
    assert "during the evaluation" in stdout
    ckpt = load_checkpoint(out / "ckpt.pt")
    assert ckpt["iter"] == 4 and ckpt["metrics"] is None  # the evaluation is redone on resume
    assert not [r for r in records(out) if "val_loss" in r]


@pytest.mark.slow
def test_sigterm_between_micro_steps_drops_the_step_and_resumes_exactly(char_data, tmp_path):
    more = ["--max_iters=4", "--batch.grad_accum=400", "--eval.eval_interval=100", "--model.dropout=0.1"]
    train.main(args(char_data, tmp_path / "whole", *more))
    out = tmp_path / "parts"
    stdout = _stop_during(char_data, out, more, "iter 1:")
    assert "stopping after this micro-step" in stdout and "the unfinished step is dropped" in stdout
    stopped_at = load_checkpoint(out / "ckpt.pt")["iter"]
    assert stopped_at < 4
    train.main(args(char_data, out, *more, "--resume"))
    assert step_losses(out) == step_losses(tmp_path / "whole")  # bit for bit, dropout included


def test_resume_without_config_toml_uses_the_configuration_in_the_checkpoint(char_data, tmp_path, capsys):
    out = tmp_path / "run"
    train.main(args(char_data, out, "--max_iters=4", "--optim.lr=1e-3"))
    (out / "config.toml").unlink()
    train.main(["--resume", f"--run.out_dir={out}", "--max_iters=6"])
    assert "config.toml is missing: resuming with the configuration stored in ckpt.pt" in capsys.readouterr().out
    assert load_checkpoint(out / "ckpt.pt")["config"]["optim"]["lr"] == 1e-3


def test_a_step_dropped_right_after_an_evaluation_keeps_its_metrics(char_data, tmp_path):
    """SIGTERM during the last evaluation batch: the evaluation completes, the next step is dropped,
    and the evaluation's checkpoint (with its metrics) stays; resuming does not evaluate again."""
    more = ["--max_iters=8", "--batch.grad_accum=400", "--eval.eval_interval=1", "--eval.eval_iters=1"]
    train.main(args(char_data, tmp_path / "whole", *more))
    out = tmp_path / "parts"
    _stop_during(char_data, out, more, "eval 1:")
    ckpt = load_checkpoint(out / "ckpt.pt")
    assert ckpt["metrics"] is not None  # no checkpoint without metrics was written over it
    train.main(args(char_data, out, *more, "--resume"))
    evals = [r["iter"] for r in records(out) if "val_loss" in r]
    assert evals == sorted(set(evals)) == list(range(1, 9))  # each iteration evaluated once
    assert step_losses(out) == step_losses(tmp_path / "whole")


def test_a_new_run_of_zero_iterations_evaluates_the_initial_model(char_data, tmp_path):
    train.main(args(char_data, tmp_path / "run", "--max_iters=0"))
    ckpt = load_checkpoint(tmp_path / "run" / "ckpt.pt")
    assert ckpt["iter"] == 0 and ckpt["metrics"]["val_loss"] > 0


# ---- kills at every step of an operation --------------------------------------------------------

# Runs a command in a fresh process and kills it (SIGKILL: no clean-up, no finally) at the
# `at`-th file-system step (rename, replace, link, unlink, rmdir, rmtree) taken inside `inside`
# (a "module:Class.method" or "module:function"); exits 0 if the command takes fewer steps.
KILL_AT_STEP = r"""
import importlib, os, shutil, signal, sys

at, inside, command, argv = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:]
steps, active = 0, False

def counted(fn):
    def step(*a, **k):
        global steps
        if active:
            steps += 1
            if steps == at:
                os.kill(os.getpid(), signal.SIGKILL)
        return fn(*a, **k)
    return step

def activating(fn):
    def run(*a, **k):
        global active
        active = True
        try:
            return fn(*a, **k)
        finally:
            active = False
    return run

for name in ("rename", "replace", "link", "unlink", "rmdir"):
    setattr(os, name, counted(getattr(os, name)))
shutil.rmtree = counted(shutil.rmtree)
module, _, attr = inside.partition(":")
owner = importlib.import_module(module)
*path, last = attr.split(".")
for part in path:
    owner = getattr(owner, part)
setattr(owner, last, activating(getattr(owner, last)))
module, _, function = command.partition(":")
getattr(importlib.import_module(module), function)(argv)
"""


def kill_at_step(at: int, inside: str, command: str, argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", KILL_AT_STEP, str(at), inside, command, *map(str, argv)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def shard_dirs_named(out_dir):
    """The shard directories the checkpoint files of a run name."""
    return {load_checkpoint(p).get("shards") for p in [*out_dir.glob("ckpt*.pt"), out_dir / "best.pt"] if p.is_file()}


@pytest.mark.slow
def test_a_killed_resave_of_a_sharded_checkpoint_leaves_a_usable_checkpoint_at_every_step(char_data, tmp_path):
    """A run stopped during its evaluation at iteration 4 is resumed: it evaluates and saves
    iteration 4 again. Killed at each step of that save, the run directory still loads, and a
    resume then completes the run, with every shard directory a checkpoint names in place."""
    from gpt.checkpoint import load_model

    pristine = tmp_path / "pristine"
    run = args(char_data, pristine, "--max_iters=4", "--eval.eval_interval=2", "--system.parallel=fsdp")
    train.main(run)
    stopped = load_checkpoint(pristine / "ckpt-0000004.pt") | {"metrics": None}  # as a stop during the evaluation leaves it
    for name in ("ckpt-0000004.pt", "ckpt.pt"):  # best.pt keeps the first save (and needs its shards)
        (pristine / name).unlink()
        torch.save(stopped, pristine / name)
    at = 0
    while True:
        at += 1
        out = tmp_path / f"kill{at}"
        shutil.copytree(pristine, out)
        resume = ["--resume", f"--run.out_dir={out}"]
        killed = kill_at_step(at, "gpt.trainer:Trainer.save", "train:main", resume)
        if killed.returncode == 0:
            break  # the save has fewer steps than `at`: every step was tried
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
        model, _, ckpt = load_model(out / "ckpt.pt")  # loads: the shards it names are whole
        assert ckpt["iter"] == 4
        train.main(resume)  # and the run completes
        final = load_checkpoint(out / "ckpt.pt")
        assert final["iter"] == 4 and final["metrics"] is not None, at
        assert {p.name for p in out.glob("*.shards")} == shard_dirs_named(out), at  # none missing, none orphaned
        load_model(out / "best.pt")
    assert at > 8  # the save was interrupted at each of its steps (renames, links, removals)
    assert {p.name for p in out.glob("*.shards")} == shard_dirs_named(out) == {
        "ckpt-0000002.shards", "ckpt-0000004.shards", "ckpt-0000004.2.shards"}


def test_a_killed_run_leaves_its_directory_free_at_every_step_of_taking_the_lock(tmp_path):
    """DirectoryLock is released by the operating system when its owner dies: a process killed
    at any line of taking (or releasing) it leaves the directory free for the next run."""
    lines = subprocess.run([sys.executable, "-c", LOCK_LINES, str(tmp_path), "0"], cwd=ROOT, capture_output=True,
                           text=True, timeout=120)
    total = int(lines.stdout.split()[-1])
    assert total >= 8, lines.stderr
    for at in range(1, total + 1):
        killed = subprocess.run([sys.executable, "-c", LOCK_LINES, str(tmp_path), str(at)], cwd=ROOT, timeout=120)
        assert killed.returncode == -signal.SIGKILL
        DirectoryLock(tmp_path).release()  # free: taken and given back at once


# Takes and releases a DirectoryLock, killing itself at the `at`-th line run inside gpt/atomic.py
# (0: count the lines and print the count).
LOCK_LINES = r"""
import os, signal, sys
from gpt.atomic import DirectoryLock

at, lines = int(sys.argv[2]), 0
def trace(frame, event, arg):
    global lines
    if frame.f_code.co_filename.endswith(os.path.join("gpt", "atomic.py")) and event == "line":
        lines += 1
        if lines == at:
            os.kill(os.getpid(), signal.SIGKILL)
    return trace
sys.settrace(trace)
DirectoryLock(sys.argv[1]).release()
sys.settrace(None)
print(lines)
"""


@pytest.mark.slow
def test_a_second_run_on_a_directory_in_use_is_refused_naming_the_live_process(char_data, tmp_path, capsys):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "train.py", *args(char_data, out, "--max_iters=100000",
                                                              "--eval.eval_interval=2")],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "ckpt.pt").exists():
        assert time.time() < deadline and first.poll() is None, first.stderr.read() if first.poll() is not None else ""
        time.sleep(0.1)
    fails_with(capsys, ["--resume", f"--run.out_dir={out}"], f"is in use by another run (process {first.pid} on")
    fails_with(capsys, args(char_data, out, "--overwrite"), f"(process {first.pid} on")
    assert first.poll() is None  # the first run trains on, its files untouched
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=120) == 0, first.stderr.read()
    stopped_at = load_checkpoint(out / "ckpt.pt")["iter"]
    # a run killed outright leaves its lock file behind: the next run recognises it as free
    killed = subprocess.Popen([sys.executable, "train.py", "--resume", f"--run.out_dir={out}"], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while load_checkpoint(out / "ckpt.pt")["iter"] == stopped_at:
        assert time.time() < deadline + 120 and killed.poll() is None
        time.sleep(0.1)
    killed.kill()
    killed.wait()
    assert str(killed.pid) in (out / ".lock").read_text()
    at = load_checkpoint(out / "ckpt.pt")["iter"]
    train.main(["--resume", f"--run.out_dir={out}", f"--max_iters={at + 2}"])
    assert load_checkpoint(out / "ckpt.pt")["iter"] == at + 2


def test_a_run_that_fails_to_start_leaves_no_directory_behind(char_data, tmp_path, capsys):
    out = tmp_path / "new" / "run"
    fails_with(capsys, args(char_data, out, f"--run.init_from={tmp_path / 'nowhere.pt'}"), "does not exist")
    assert not out.exists()


# ---- another number of processes ------------------------------------------------------------------


TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py"]


def cli(*argv):
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_a_run_resumed_on_another_number_of_processes_keeps_its_batch_and_validation_set(char_data, tmp_path):
    """Trained on 1 process with 2 micro-batches per step (batch.tokens_per_step = 0), resumed on 2:
    each process takes one, so the steps, losses, weights and the validation loss (measured on
    the same windows) are those of a run that never stopped."""
    more = ["--batch.grad_accum=2", "--max_iters=6", "--eval.eval_interval=4"]
    whole = cli("train.py", *args(char_data, tmp_path / "whole", *more))
    assert whole.returncode == 0, whole.stderr
    parts = tmp_path / "parts"
    assert cli("train.py", *args(char_data, parts, *more, "--max_iters=4")).returncode == 0
    resumed = cli(*TORCHRUN, "--resume", f"--run.out_dir={parts}", "--max_iters=6")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "2 process(es) now share the run's 2 micro-batches per step" in resumed.stdout
    assert "256 tokens per step (4 x 32 x 1 accumulation x 2)" in resumed.stdout
    assert load_checkpoint(parts / "ckpt.pt")["micro_batches_per_step"] == 2
    a, b = records(tmp_path / "whole"), records(parts)
    assert [r["iter"] for r in a] == [r["iter"] for r in b]
    for ra, rb in zip(a, b):
        for key in ("loss", "train_loss", "val_loss"):
            assert ra.get(key) == pytest.approx(rb.get(key), abs=1e-5), (ra, rb)
    # 3 micro-batches per step cannot be shared by 2 processes: refused, one line from one process
    odd = tmp_path / "odd"
    assert cli("train.py", *args(char_data, odd, "--batch.grad_accum=3", "--max_iters=2")).returncode == 0
    refused = cli(*TORCHRUN, "--resume", f"--run.out_dir={odd}", "--max_iters=4")
    assert refused.returncode != 0 and "exitcode  : 2" in refused.stderr, refused.stderr[-3000:]
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: the run takes 3 micro-batches of 4 per optimiser step, which 2 processes cannot share "
                      "evenly (a resumed run keeps its global batch): resume on a number of processes that divides 3"]
    frames = [line for line in refused.stderr.splitlines() if line.strip().startswith("File ")]
    assert not [f for f in frames if "train.py" in f or "/gpt/" in f], frames  # torchrun's own report only
    assert load_checkpoint(odd / "ckpt.pt")["iter"] == 2  # untouched


def test_a_file_system_without_locks_is_used_unprotected_with_a_note(tmp_path, monkeypatch, capsys):
    """Some network and FUSE mounts refuse flock: the run goes on and says it is unprotected,
    rather than blaming "another run"."""
    import errno

    import gpt.atomic as atomic

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(atomic.fcntl, "flock", no_locks)
    DirectoryLock(tmp_path).release()
    assert "cannot be locked (No locks available): nothing stops a second run" in capsys.readouterr().err
