"""The Quickstart's smoke run, as a user runs it: a real process, real text."""

import re
import subprocess
import sys

import pytest


def run(*args):
    return subprocess.run([sys.executable, "-m", "gpt.smoke", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_smoke_run_trains_and_generates():
    result = run("--steps", "50")
    assert result.returncode == 0, result.stderr
    losses = [float(x) for x in re.findall(r"\| loss ([\d.]+)", result.stdout)]
    assert len(losses) == 3  # steps 1, 25, 50
    assert losses[-1] < losses[0] - 1.0  # learns: byte-level loss starts near ln(257) = 5.5
    assert "greedy continuation of 'def forward(self'" in result.stdout


def test_bad_arguments_exit_2_with_one_line():
    result = run("--steps", "0")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --steps must be at least 1, got 0"
    result = run("--tokenizer", "wordpiece", "--steps", "1")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: unknown tokenizer 'wordpiece': choose one of gpt2, char, byte"
