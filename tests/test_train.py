"""train.py end to end on a tiny model and real (small) Shakespeare data: exact resume,
DDP equivalence, signals, crash safety, precision, logging, and the errors a user can cause."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import train
from gpt.checkpoint import load_checkpoint, save_checkpoint
from gpt.prepare import prepare

from conftest import ROOT, fails_with, last_wins

TINY = [
    "--model.n_layer=2", "--model.n_head=2", "--model.n_embd=32", "--model.block_size=32", "--model.vocab_multiple=1",
    "--batch.batch_size=4", "--optim.lr=3e-3", "--optim.warmup_iters=2", "--optim.decay_iters=12",
    "--eval.eval_interval=4", "--eval.eval_iters=2", "--log.log_interval=1", "--log.plot=false", "--run.seed=5",
]


@pytest.fixture
def data_dir(char_data):
    return char_data


def args(data_dir, out_dir, *more):
    return last_wins(["--data.dir=" + str(data_dir), "--run.out_dir=" + str(out_dir), *TINY, *more])


def metrics(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def step_losses(out_dir):
    return {r["iter"]: r["loss"] for r in metrics(out_dir) if "loss" in r}


def weights(out_dir):
    return load_checkpoint(out_dir / "ckpt.pt")["model"]


def run_cli(*argv, env=None, timeout=300):
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_a_run_writes_config_metrics_and_checkpoints(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    train.main(args(data_dir, out, "--max_iters=8", "--run.keep_last=1"))
    printed = capsys.readouterr().out
    assert "iter 8: loss" in printed and "eval 8: train loss" in printed and "tok/s" in printed
    records = metrics(out)
    assert [r["iter"] for r in records if "loss" in r] == list(range(1, 9))
    assert all({"iter", "loss", "lr", "tokens_per_sec", "grad_norm"} <= r.keys() for r in records if "loss" in r)
    assert [r["iter"] for r in records if "val_loss" in r] == [4, 8]
    assert records[-1]["val_loss"] < 4.0  # below ln(vocab) = uniform guessing
    ckpt = load_checkpoint(out / "ckpt.pt")
    assert ckpt["iter"] == 8 and ckpt["tokenizer"]["name"] == "char"
    assert not any(k.startswith("_orig_mod") for k in ckpt["model"])
    assert sorted(p.name for p in out.glob("*.pt")) == ["best.pt", "ckpt-0000008.pt", "ckpt.pt"]
    assert "[model]" in (out / "config.toml").read_text()


def test_resume_is_bit_exact_on_cpu(data_dir, tmp_path):
    dropout = "--model.dropout=0.1"  # random generators matter too
    train.main(args(data_dir, tmp_path / "whole", "--max_iters=12", dropout))
    train.main(args(data_dir, tmp_path / "parts", "--max_iters=5", dropout))
    train.main(args(data_dir, tmp_path / "parts", "--max_iters=12", dropout, "--resume"))
    whole, parts = step_losses(tmp_path / "whole"), step_losses(tmp_path / "parts")
    assert whole == parts  # every iteration 1..12, bit for bit
    for name, tensor in weights(tmp_path / "whole").items():
        assert torch.equal(tensor, weights(tmp_path / "parts")[name]), name


@pytest.mark.slow
def test_two_processes_equal_one_with_the_same_global_batch(data_dir, tmp_path):
    one = run_cli("train.py", *args(data_dir, tmp_path / "one", "--max_iters=6", "--batch.tokens_per_step=256"))  # 4 x 32 x 2
    assert one.returncode == 0, one.stderr
    two = run_cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
                  *args(data_dir, tmp_path / "two", "--max_iters=6", "--batch.tokens_per_step=256"), env={"OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, f"exit {two.returncode}\n{two.stdout[-2000:]}\n{two.stderr[-6000:]}"  # kept for diagnosis
    assert "2 process(es), 256 tokens per step (4 x 32 x 1 accumulation x 2)" in two.stdout
    assert "1 process(es), 256 tokens per step (4 x 32 x 2 accumulation x 1)" in one.stdout
    l1, l2 = step_losses(tmp_path / "one"), step_losses(tmp_path / "two")
    assert l1.keys() == l2.keys() == set(range(1, 7))
    for it in l1:
        assert l1[it] == pytest.approx(l2[it], abs=1e-5)
    e1, e2 = ([r for r in metrics(tmp_path / run) if "val_loss" in r] for run in ("one", "two"))
    assert [r["iter"] for r in e1] == [r["iter"] for r in e2] == [4, 6]
    for r1, r2 in zip(e1, e2):  # the same validation windows, shared out between the two processes
        assert (r1["train_loss"], r1["val_loss"]) == pytest.approx((r2["train_loss"], r2["val_loss"]), abs=1e-5)
    w1, w2 = weights(tmp_path / "one"), weights(tmp_path / "two")
    for name in w1:
        torch.testing.assert_close(w1[name], w2[name], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_the_run_resumes(data_dir, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "train.py", *args(data_dir, out, "--max_iters=100000",
                                                               "--eval.eval_interval=100000")],  # the signal lands in a step
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not ((out / "metrics.jsonl").exists() and len(metrics(out)) >= 3):
        assert time.time() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert "SIGTERM: finishing this step" in stdout and "writing a checkpoint" in stdout
    stopped_at = load_checkpoint(out / "ckpt.pt")["iter"]
    assert stopped_at >= 3 and max(step_losses(out)) == stopped_at
    train.main(args(data_dir, out, f"--max_iters={stopped_at + 3}", "--resume"))
    assert load_checkpoint(out / "ckpt.pt")["iter"] == stopped_at + 3
    assert max(step_losses(out)) == stopped_at + 3


KILL_WHILE_SAVING = """
import sys, torch
from gpt.checkpoint import save_checkpoint
save_checkpoint({"iter": 2, "model": {"w": torch.randn(300_000_000 // 4)}}, sys.argv[1], keep_last=3, is_best=False)
"""


@pytest.mark.slow
def test_a_process_killed_while_saving_leaves_the_previous_checkpoint(tmp_path):
    save_checkpoint({"iter": 1, "model": {"w": torch.arange(5.0)}}, tmp_path, keep_last=3, is_best=True)
    proc = subprocess.Popen([sys.executable, "-c", KILL_WHILE_SAVING, str(tmp_path)], cwd=ROOT)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".ckpt-0000002.pt.tmp-*")):
        assert time.time() < deadline and proc.poll() is None, "the writer finished before it could be killed"
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    assert not (tmp_path / "ckpt-0000002.pt").exists()
    ckpt = load_checkpoint(tmp_path / "ckpt.pt")
    assert ckpt["iter"] == 1 and torch.equal(ckpt["model"]["w"], torch.arange(5.0))


def test_bfloat16_autocast_runs_on_cpu(data_dir, tmp_path, capsys):
    train.main(args(data_dir, tmp_path / "bf16", "--max_iters=3", "--system.dtype=bfloat16"))
    assert "on cpu (bfloat16)" in capsys.readouterr().out
    assert all(torch.isfinite(torch.tensor(v)) for v in step_losses(tmp_path / "bf16").values())


def test_schedules_and_fresh_start_in_a_used_out_dir(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    train.main(args(data_dir, out, "--max_iters=6", "--optim.schedule=wsd", "--optim.decay_iters=2"))
    lrs = [r["lr"] for r in metrics(out) if "loss" in r]
    assert lrs[0] < lrs[1] < lrs[2] == lrs[3] == lrs[4] == 3e-3 > lrs[5]  # warmup, stable, decay
    capsys.readouterr()
    fails_with(capsys, args(data_dir, out, "--max_iters=2", "--optim.schedule=constant"),  # a forgotten --resume
               f"run.out_dir {out} holds another run (best.pt, ckpt-0000004.pt, ckpt-0000006.pt ...): continue it "
               f"with --resume, start again there with --overwrite")
    assert load_checkpoint(out / "ckpt.pt")["iter"] == 6  # nothing was removed
    train.main(args(data_dir, out, "--max_iters=2", "--optim.schedule=constant", "--overwrite"))
    assert "the previous run's 4 checkpoint file(s) are replaced" in capsys.readouterr().out
    assert sorted(p.name for p in out.glob("*.pt")) == ["best.pt", "ckpt-0000002.pt", "ckpt.pt"]
    assert [r["iter"] for r in metrics(out) if "loss" in r] == [1, 2]
    assert load_checkpoint(out / "ckpt.pt")["iter"] == 2


def test_continued_pretraining_from_a_hugging_face_directory(tmp_path, shakespeare_docs):
    transformers = pytest.importorskip("transformers")
    (tmp_path / "play.txt").write_text(shakespeare_docs[3])
    prepare([str(tmp_path / "play.txt")], tmp_path / "gpt2", "gpt2", val_fraction=0.2, workers=1)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=64))
    hf.save_pretrained(tmp_path / "hf")
    train.main(["--data.dir=" + str(tmp_path / "gpt2"), "--run.out_dir=" + str(tmp_path / "out"),
                "--run.init_from=" + str(tmp_path / "hf"), "--model.block_size=32", "--max_iters=2",
                "--eval.eval_iters=1", "--log.plot=false", "--batch.batch_size=2"])
    ckpt = load_checkpoint(tmp_path / "out" / "ckpt.pt")
    assert ckpt["model_config"]["block_size"] == 32 and ckpt["model_config"]["n_embd"] == 32  # cropped, HF shape
    assert ckpt["model"]["transformer.wpe.weight"].shape == (32, 32)


def test_training_from_an_export_of_ours_reads_its_recorded_tokenizer(data_dir, tmp_path):
    """A char model exported with gpt.hf.save_pretrained(model, dir, tokenizer) trains on on char
    data through run.init_from=DIR (its ids are read as char tokens, not GPT-2's)."""
    from gpt.checkpoint import load_model
    from gpt.hf import save_pretrained

    train.main(args(data_dir, tmp_path / "run", "--max_iters=2"))
    model, tokenizer, _ = load_model(tmp_path / "run" / "ckpt.pt")
    save_pretrained(model, tmp_path / "hf", tokenizer)
    more = [a for a in args(data_dir, tmp_path / "more", "--max_iters=2", f"--run.init_from={tmp_path / 'hf'}")
            if not a.startswith("--model.vocab_multiple")]  # an HF directory pads the vocabulary its own way
    train.main(more)
    assert load_checkpoint(tmp_path / "more" / "ckpt.pt")["tokenizer"] == tokenizer.spec()


def test_loss_plot_and_the_note_without_matplotlib(data_dir, tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install matplotlib)")
    out = tmp_path / "run"
    train.main(args(data_dir, out, "--max_iters=4", "--log.plot=true"))
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    train.main(args(data_dir, tmp_path / "run2", "--max_iters=2", "--log.plot=true"))
    assert "matplotlib is not installed, so no loss.png" in capsys.readouterr().err
    assert not (tmp_path / "run2" / "loss.png").exists()


def test_wandb_offline_writes_a_run(data_dir, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is not installed (pip install 'gpt[wandb]')")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    train.main(args(data_dir, tmp_path / "run", "--max_iters=2", "--log.wandb=true"))
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))


# ---- errors a user can cause: exit 2 and one line ---------------------------------------------


def test_resume_without_a_checkpoint(data_dir, tmp_path, capsys):
    fails_with(capsys, args(data_dir, tmp_path / "empty", "--run.init_from=resume"),
               "nothing to resume: " + str(tmp_path / "empty") + " has no ckpt.pt")
    fails_with(capsys, ["--run.out_dir=" + str(tmp_path / "none"), "--resume"], "nothing to resume")


def test_resume_with_a_different_architecture_names_the_field(data_dir, tmp_path, capsys):
    train.main(args(data_dir, tmp_path / "run", "--max_iters=2"))
    fails_with(capsys, args(data_dir, tmp_path / "run", "--max_iters=4", "--model.n_layer=3", "--resume"),
               "--model.n_layer=3 would change the resumed run (it has 2)")


def test_data_directory_not_prepared(tmp_path, capsys):
    fails_with(capsys, ["--data.dir=" + str(tmp_path / "nowhere"), "--run.out_dir=" + str(tmp_path / "o")],
               "has no meta.json: prepare it with python -m gpt.prepare")


def test_data_prepared_for_another_tokenizer(data_dir, tmp_path, capsys):
    fails_with(capsys, args(data_dir, tmp_path / "o", "--model.vocab_size=50257"),
               "model.vocab_size = 50257, but " + str(data_dir))


def test_batch_not_divisible_by_the_world(data_dir, tmp_path, capsys):
    fails_with(capsys, args(data_dir, tmp_path / "o", "--batch.tokens_per_step=1000"),
               "batch.tokens_per_step (1,000) must be a multiple of batch_size x block_size x processes = 4 x 32 x 1 = 128")


def test_out_dir_that_cannot_be_written(data_dir, tmp_path, capsys):
    (tmp_path / "file").write_text("not a directory")
    fails_with(capsys, args(data_dir, tmp_path / "file" / "run"), "cannot be written")


def test_diverging_loss_stops_with_the_iteration_and_last_checkpoint(data_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(args(data_dir, tmp_path / "run", "--max_iters=50", "--optim.lr=1e6", "--optim.grad_clip=0",
                        "--optim.warmup_iters=0", "--optim.schedule=constant"))
    err = capsys.readouterr().err
    assert e.value.code == 1 and "the loss is nan at iteration" in err.lower() and "last good checkpoint" in err
