"""sample.py as a user runs it: from a checkpoint trained here, or a Hugging Face directory."""

import subprocess
import sys

import pytest

import train
from gpt.prepare import prepare

from conftest import ROOT


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, shakespeare_docs):
    """A tiny char model trained for a few steps on real Shakespeare."""
    root = tmp_path_factory.mktemp("sample")
    (root / "play.txt").write_text(shakespeare_docs[3])
    (root / "poem.txt").write_text(shakespeare_docs[2])
    prepare([str(root / "*.txt")], root / "char", "char", val_fraction=0.5, workers=1, progress=False)
    train.main(["--data.dir=" + str(root / "char"), "--run.out_dir=" + str(root / "out"), "--max_iters=30",
                "--model.n_layer=2", "--model.n_embd=32", "--model.n_head=2", "--model.block_size=32",
                "--batch.batch_size=8", "--optim.lr=1e-2", "--log.plot=false", "--eval.eval_iters=1"])
    return root / "out"


def sample(*argv):
    return subprocess.run([sys.executable, "sample.py", *argv], capture_output=True, text=True, cwd=ROOT, timeout=300)


@pytest.mark.parametrize("mode", ["--stream", "--no-stream"])
def test_samples_are_printed_and_separated(run_dir, mode):
    run = sample(f"--out_dir={run_dir}", "--prompt=ROMEO:", "--num_samples=2", "--max_new_tokens=40", mode)
    assert run.returncode == 0, run.stderr
    samples = run.stdout.split("-" * 40)
    assert len(samples) == 2 and all(s.strip().startswith("ROMEO:") for s in samples)
    assert all(len(s.strip()) > len("ROMEO:") + 10 for s in samples)


def test_streaming_and_batch_agree_and_stop_strings_cut(run_dir):
    common = [f"--out_dir={run_dir}", "--prompt=ROMEO:", "--num_samples=1", "--max_new_tokens=40", "--seed=3"]
    full = sample(*common, "--no-stream").stdout
    assert full.startswith("ROMEO:") and full.endswith("\n")
    assert sample(*common, "--stream").stdout == full  # same seed, same text, printed as it grows
    generated = full[len("ROMEO:") : -1]
    stop = generated[10:12]
    cut = sample(*common, f"--stop={stop}", "--stream").stdout
    assert cut == "ROMEO:" + generated[: generated.find(stop)] + "\n"
    greedy = sample(f"--out_dir={run_dir}", "--prompt=ROMEO:", "--num_samples=2", "--temperature=0",
                    "--max_new_tokens=20", "--no-stream")
    assert "-" * 40 not in greedy.stdout and "same text every time: one sample" in greedy.stderr


def test_beam_search_prints_the_best_beam_at_the_end(run_dir):
    common = [f"--out_dir={run_dir}", "--prompt=ROMEO:", "--num_beams=3", "--max_new_tokens=30"]
    batch, live = sample(*common, "--no-stream"), sample(*common, "--stream")
    assert batch.returncode == 0 and live.returncode == 0, batch.stderr + live.stderr
    assert batch.stdout == live.stdout and batch.stdout.startswith("ROMEO:") and len(batch.stdout) > len("ROMEO:") + 5
    assert "beam search chooses its text at the end" in live.stderr


@pytest.mark.slow
def test_compiled_decoding_gives_the_same_text(run_dir):
    common = [f"--out_dir={run_dir}", "--prompt=ROMEO:", "--temperature=0", "--max_new_tokens=30", "--no-stream"]
    compiled, eager = sample(*common, "--compile"), sample(*common, "--no-compile")
    assert compiled.returncode == 0, compiled.stderr
    assert compiled.stdout == eager.stdout


def test_empty_prompt_starts_from_end_of_text(run_dir):
    run = sample(f"--out_dir={run_dir}", "--prompt=", "--num_samples=1", "--max_new_tokens=10", "--no-stream")
    assert run.returncode == 0 and "empty prompt: starting from <|endoftext|>" in run.stderr


def test_hugging_face_directory(tmp_path):
    transformers = pytest.importorskip("transformers")
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=64)).save_pretrained(tmp_path)
    run = sample(f"--init_from={tmp_path}", "--prompt=Hello world", "--num_samples=1", "--max_new_tokens=5",
                 "--penalty_alpha=0.6", "--top_k=4", "--no-stream")
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("Hello world")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--out_dir=/nonexistent/run"], "no checkpoint at /nonexistent/run/ckpt.pt"),
        (["--top_p=1.5"], "top_p must be in (0, 1], got 1.5"),
        (["--top_k=0"], "top_k must be >= 1, got 0"),
        (["--temperature=-0.5"], "temperature must be >= 0 (0 = greedy), got -0.5"),
        (["--penalty_alpha=2"], "penalty_alpha must be in [0, 1], got 2.0"),
        (["--min_p=-0.1"], "min_p must be in [0, 1], got -0.1"),
        (["--repetition_penalty=0"], "repetition_penalty must be > 0 (1 = off), got 0.0"),
        (["--max_new_tokens=0"], "max_new_tokens must be at least 1, got 0"),
        (["--prompt=ROMEO: 🚀 ∑"], "2 character(s) not in this char tokenizer's vocabulary: '∑', '🚀'"),
    ],
)
def test_bad_input_exits_2_with_one_line(run_dir, argv, message):
    run = sample(f"--out_dir={run_dir}", "--max_new_tokens=5", *argv)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.startswith("error: ") and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert message in run.stderr, run.stderr


def test_a_long_silent_run_says_so(run_dir):
    """--no-stream prints nothing until the end: a long one says that first (to a log, not a terminal)."""
    run = sample(f"--out_dir={run_dir}", "--max_new_tokens=2500", "--num_samples=1", "--no-stream", "--seed=3")
    assert run.returncode == 0, run.stderr
    assert "note: generating up to 2,500 tokens per sample without --stream" in run.stderr
