"""benchmarks/gpu_check.py --dry: every part of the GPU check runs on the CPU at toy sizes, so
the script is known to work before a GPU is spent on it."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_the_dry_gpu_check_runs_every_part_and_writes_its_figures(tmp_path):
    out = tmp_path / "check"
    run = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--out", str(out), "--dry"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    records = [json.loads(line) for line in (out / "gpu.jsonl").read_text().splitlines()]
    failed = [r for r in records if r["bench"] == "failed"]
    assert run.returncode == 0 and not failed, f"{failed}\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    assert {r["part"] for r in records} == {"tests", "train", "generate", "quality", "attention", "fsdp"}
    assert all(r["device"] == "cpu" and r["dry"] and r["torch"] for r in records)
    by = {r["bench"]: r for r in records}
    assert by["gpu_tests"]["exit"] == 0 and by["gpu_tests"]["skipped"] >= 4  # skipped cleanly without CUDA
    assert by["train_step"]["tokens_per_sec"] > 0 and by["generate"]["identical_tokens"]
    assert 0 < by["generate"]["roofline_fraction"] < 1
    assert by["fsdp_resume"]["iters"] == [2, 4]  # evaluated before and after the resume
    assert "| bench | impl | figures |" in run.stdout


def test_a_bad_part_or_no_gpu_is_one_line(tmp_path):
    run = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--out", str(tmp_path), "--parts", "trian"],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 2 and "unknown part(s) trian: choose from tests, train" in run.stderr
    run = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--out", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, env={"CUDA_VISIBLE_DEVICES": "", "PATH": ""})
    assert run.returncode == 2 and "no CUDA GPU here: run with --dry" in run.stderr
