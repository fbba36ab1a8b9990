"""Nothing lost, nothing half-written: a run's directory survives mistakes, kills and damage,
and a resumed run continues the run it resumes (its own settings, its exact trajectory)."""

import json
import signal
import subprocess
import sys
import time

import pytest

import train
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
