"""The whole GPU check in one prepared command: tests, training speed, decoding speed, time to
quality, attention kernels and a sharded run with a resume, each beside nanoGPT where it
applies.

    python benchmarks/gpu_check.py --out DIR                        # on a CUDA machine
    python benchmarks/gpu_check.py --out DIR --nanogpt ~/nanoGPT    # with nanoGPT's own train.py beside ours
    python benchmarks/gpu_check.py --out DIR --parts train,generate # some parts only
    python benchmarks/gpu_check.py --out DIR --dry                  # every part on the CPU at toy sizes

Parts (in this order; --parts picks some):
  tests      python -m pytest -m gpu (tests/test_gpu.py): counts of passed / failed / skipped
  train      benchmarks/train_bench.py on GPT-2 124M, synthetic tokens, T=1024, B=16/32/64, bf16,
             compiled; nanoGPT's train.py on the same shape and tokens (bias on, as nanoGPT's default)
  generate   benchmarks/generate_bench.py, compiled, bf16: tokens/s and the share of the memory
             roofline reached at batch 1
  quality    time to quality: configs/shakespeare_char_gpu.toml against nanoGPT's own
             config/train_shakespeare_char.py, both on the shipped Shakespeare (character level,
             the same prepared tokens), wall time of each whole process (compile included) and
             its final validation loss. The target: ours at or below nanoGPT's loss in at most
             half its time.
  attention  benchmarks/attention_bench.py: fused attention vs written out, causal and windowed
  fsdp       torchrun with system.parallel = "fsdp" on every GPU of the machine, then a resume

It needs what a bare GPU machine has (torch, triton, transformers, tiktoken, numpy), no network.
Each figure is one JSON object (bench, part, impl "ours" / "nanogpt", device, torch, and the
figure's fields) appended to DIR/gpu.jsonl; a part that fails is recorded with its error and
the check goes on. A summary table goes to stdout at the end. nanoGPT runs from a copy in
DIR (its directory is never written). --dry runs every part on the CPU at toy sizes, to show
that the script works before a GPU is spent on it (a test does: tests/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("tests", "train", "generate", "quality", "attention", "fsdp")
TOY = ["--model.n_layer=1", "--model.n_head=2", "--model.n_embd=32", "--model.block_size=32"]  # --dry's model


class Check:
    """Runs the commands of the parts and writes their figures."""

    def __init__(self, out: Path, dry: bool, nanogpt: Path | None):
        self.out, self.dry, self.nanogpt = out, dry, nanogpt
        self.out.mkdir(parents=True, exist_ok=True)
        self.jsonl = out / "gpu.jsonl"
        self.device = "cpu" if dry or not torch.cuda.is_available() else torch.cuda.get_device_name(0)
        self.records: list[dict] = []

    def record(self, bench: str, part: str, impl: str = "ours", **fields) -> dict:
        row = {"bench": bench, "part": part, "impl": impl, "device": self.device, "torch": torch.__version__,
               "dry": self.dry, **fields}
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
        self.records.append(row)
        return row

    def run(self, args: list[str], *, timeout: float, cwd: Path = ROOT, env: dict | None = None, log: str = "",
            check: bool = True) -> subprocess.CompletedProcess:
        """A command (its output kept in DIR/logs/LOG.txt); a non-zero exit raises with its tail."""
        environment = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        if self.dry:
            environment["CUDA_VISIBLE_DEVICES"] = ""
        t0 = time.perf_counter()
        try:
            done = subprocess.run(args, cwd=cwd, env=environment, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise RuntimeError(f"{' '.join(map(str, args[:4]))} ... ran past its {timeout:.0f} s") from e
        done.seconds = time.perf_counter() - t0
        if log:
            logs = self.out / "logs"
            logs.mkdir(exist_ok=True)
            (logs / f"{log}.txt").write_text(f"$ {' '.join(map(str, args))}\n{done.stdout}\n{done.stderr}")
        if check and done.returncode != 0:
            said = [line for line in done.stderr.splitlines() if line.startswith("error: ")]  # our one-line errors
            raise RuntimeError(f"exit {done.returncode}: {said[0] if said else done.stderr.strip()[-1500:]}")
        return done

    def nanogpt_copy(self) -> Path:
        """nanoGPT's code, copied into DIR (its data directories are written there, not in the user's)."""
        copy = self.out / "nanogpt"
        if not copy.exists():
            shutil.copytree(self.nanogpt, copy, ignore=shutil.ignore_patterns(".git", "data", "out*", "*.bin", "*.pt"))
        return copy


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


# ---- the parts ------------------------------------------------------------------------------------


def part_tests(c: Check) -> None:
    done = c.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"],
                 timeout=300, log="tests", check=False)
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error)", done.stdout.splitlines()[-1])}
    c.record("gpu_tests", "tests", exit=done.returncode, seconds=round(done.seconds, 1), **counts)


def synthetic_tokens(directory: Path, tokens: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", tokens), ("val", tokens // 10)):
        rng.integers(0, 50257, n, dtype=np.uint16).tofile(directory / f"{split}.bin")


def part_train(c: Check) -> None:
    sizes = (2,) if c.dry else (16, 32, 64)
    for B in sizes:
        T = 32 if c.dry else 1024
        ours = [sys.executable, "benchmarks/train_bench.py", "configs/gpt2_124m.toml", "--synthetic",
                f"--batch.batch_size={B}", f"--batch.tokens_per_step={B * T}"]
        ours += [*TOY, "--system.device=cpu", "--system.compile=false", "--iters=2", "--warmup=1"] if c.dry else \
            ["--iters=10", "--warmup=5"]
        for row in json_lines(c.run(ours, timeout=300, log=f"train_ours_B{B}").stdout):
            c.record("train_step", "train", batch_size=B, seq_len=T, **{k: v for k, v in row.items() if k != "bench"})
        if c.nanogpt:
            train_nanogpt(c, B, T)


def train_nanogpt(c: Check, B: int, T: int) -> None:
    """nanoGPT's train.py at the same shape, on random tokens: its own per-iteration times."""
    copy = c.nanogpt_copy()
    if not (copy / "data" / "synthetic" / "train.bin").exists():
        synthetic_tokens(copy / "data" / "synthetic", 200_000 if c.dry else 5_000_000)
    iters = 4 if c.dry else 15
    cmd = [sys.executable, "train.py", "--dataset=synthetic", f"--batch_size={B}", f"--block_size={T}",
           "--gradient_accumulation_steps=1", f"--max_iters={iters}", "--eval_interval=1000000", "--eval_iters=1",
           "--log_interval=1", "--always_save_checkpoint=False", "--wandb_log=False", f"--out_dir={c.out}/nanogpt_out"]
    cmd += ["--device=cpu", "--compile=False", "--dtype=float32", "--n_layer=1", "--n_head=2", "--n_embd=32"] if c.dry \
        else ["--compile=True", "--dtype=bfloat16"]
    done = c.run(cmd, cwd=copy, timeout=300, log=f"train_nanogpt_B{B}")
    times = [float(ms) for it, ms in re.findall(r"iter (\d+): loss [\d.]+, time ([\d.]+)ms", done.stdout)
             if int(it) >= iters // 3]
    ms = statistics.median(times)
    c.record("train_step", "train", impl="nanogpt", batch_size=B, seq_len=T, ms_per_iter_median=round(ms, 2),
             tokens_per_sec=round(B * T / ms * 1e3))


def part_generate(c: Check) -> None:
    cmd = [sys.executable, "benchmarks/generate_bench.py"]
    cmd += ["--device=cpu", "--cases=char_greedy", "--repeats=1", "--no_compile"] if c.dry else \
        ["--device=cuda", "--dtype=bfloat16", "--cases=gpt2_greedy,gpt2_top_p,gpt2_beam4,char_greedy", "--repeats=5"]
    for row in json_lines(c.run(cmd, timeout=400, log="generate").stdout):
        c.record("generate", "generate", **{k: v for k, v in row.items() if k != "bench"})


def part_quality(c: Check) -> None:
    from gpt.prepare import ensure_prepared

    data = ensure_prepared(ROOT / "data" / "shakespeare", "char")
    ours = [sys.executable, "train.py", "configs/shakespeare_char_gpu.toml", f"--run.out_dir={c.out}/quality_ours",
            "--overwrite", "--log.plot=false"]
    if c.dry:
        ours += [*TOY, "--system.device=cpu", "--system.compile=false", "--system.dtype=float32", "--max_iters=20",
                 "--eval.eval_interval=10", "--eval.eval_iters=2", "--batch.batch_size=4"]
    done = c.run(ours, timeout=300, log="quality_ours")
    evals = [json.loads(line) for line in (c.out / "quality_ours" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if "val_loss" in r]
    mine = c.record("time_to_quality", "quality", config="configs/shakespeare_char_gpu.toml", wall_s=round(done.seconds, 1),
                    iters=evals[-1]["iter"], val_loss=round(evals[-1]["val_loss"], 4))
    if not c.nanogpt:
        return
    copy = c.nanogpt_copy()
    target = copy / "data" / "shakespeare_char"
    target.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):  # the very tokens ours trains and validates on
        shutil.copy(data / f"{split}.bin", target / f"{split}.bin")
    meta = json.loads((data / "meta.json").read_text())
    chars = meta["tokenizer"]["chars"]
    with open(target / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": meta["vocab_size"], "itos": dict(enumerate(chars)),
                     "stoi": {ch: i for i, ch in enumerate(chars)}}, f)
    cmd = [sys.executable, "train.py", "config/train_shakespeare_char.py", f"--out_dir={c.out}/quality_nanogpt"]
    if c.dry:
        cmd += ["--device=cpu", "--compile=False", "--dtype=float32", "--max_iters=20", "--lr_decay_iters=20",
                "--eval_interval=10", "--eval_iters=2", "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32",
                "--batch_size=4", "--warmup_iters=2"]
    done = c.run(cmd, cwd=copy, timeout=400, log="quality_nanogpt")
    steps = re.findall(r"step (\d+): train loss ([\d.]+), val loss ([\d.]+)", done.stdout)
    theirs = c.record("time_to_quality", "quality", impl="nanogpt", config="config/train_shakespeare_char.py",
                      wall_s=round(done.seconds, 1), iters=int(steps[-1][0]), val_loss=float(steps[-1][2]))
    c.record("time_to_quality_target", "quality", time_ratio=round(mine["wall_s"] / theirs["wall_s"], 3),
             loss_gap=round(mine["val_loss"] - theirs["val_loss"], 4),
             met=mine["val_loss"] <= theirs["val_loss"] and mine["wall_s"] <= 0.5 * theirs["wall_s"])


def part_attention(c: Check) -> None:
    for arch in ([], ["attention_window=256"]):
        cmd = [sys.executable, "benchmarks/attention_bench.py"]
        cmd += ["--device=cpu", "--dtype=float32", "--batch_size=1", "--seq_len=64", "--n_layer=1", "--warmup=1",
                "--steps=1"] if c.dry else []
        if arch:
            cmd += ["--arch", *(["attention_window=16"] if c.dry else arch)]
        for row in json_lines(c.run(cmd, timeout=300, log="attention" + "_".join(arch)).stdout):
            c.record("attention", "attention", **{"arch": arch, **{k: v for k, v in row.items() if k != "bench"}})


def part_fsdp(c: Check) -> None:
    gpus = 2 if c.dry else max(1, torch.cuda.device_count())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}", "train.py",
           "configs/shakespeare_char.toml", "--system.parallel=fsdp", "--optim.name=adamw",  # Muon needs whole matrices
           f"--run.out_dir={c.out}/fsdp", "--log.plot=false"]
    cmd += [*TOY, "--system.device=cpu", "--batch.batch_size=2", "--eval.eval_interval=2", "--eval.eval_iters=1",
            "--log.log_interval=1"] if c.dry else \
        ["--system.dtype=bfloat16", "--eval.eval_interval=20", "--eval.eval_iters=5", "--log.log_interval=10"]
    first, last = (2, 4) if c.dry else (40, 60)
    env = {"OMP_NUM_THREADS": "1"}
    started = c.run([*cmd, f"--max_iters={first}", "--overwrite"], timeout=300, env=env, log="fsdp")
    resumed = c.run([*cmd, f"--max_iters={last}", "--resume"], timeout=300, env=env, log="fsdp_resume")
    evals = [json.loads(line) for line in (c.out / "fsdp" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if "val_loss" in r]
    warnings = [w for w in ("Guessing device ID", "using the device under current context")
                if w in started.stderr + resumed.stderr]
    c.record("fsdp_resume", "fsdp", processes=gpus, iters=[r["iter"] for r in evals],
             val_loss=round(evals[-1]["val_loss"], 4), seconds=round(started.seconds + resumed.seconds, 1),
             nccl_warnings=warnings)


# ---- the summary ----------------------------------------------------------------------------------

SHOWN = ("batch_size", "case", "arch", "ms_per_iter_median", "tokens_per_sec", "mfu", "ours_compiled_tokens_per_s",
         "roofline_fraction", "identical_tokens", "wall_s", "val_loss", "time_ratio", "met", "passed", "failed",
         "skipped", "speedup", "iters", "error")


def summary(records: list[dict]) -> str:
    lines = ["| bench | impl | figures |", "|---|---|---|"]
    for r in records:
        figures = ", ".join(f"{k} {r[k]}" for k in SHOWN if k in r)
        lines.append(f"| {r['bench']} | {r['impl']} | {figures} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path, help="where gpu.jsonl, logs/ and the runs go")
    p.add_argument("--nanogpt", type=Path, help="a copy of karpathy/nanoGPT, to run its train.py beside ours")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, from: {', '.join(PARTS)}")
    p.add_argument("--dry", action="store_true", help="every part on the CPU at toy sizes")
    args = p.parse_args(argv)
    parts = args.parts.split(",")
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        p.error(f"unknown part(s) {', '.join(unknown)}: choose from {', '.join(PARTS)}")
    if args.nanogpt and not (args.nanogpt / "train.py").exists():
        p.error(f"--nanogpt {args.nanogpt} has no train.py: point it at a copy of karpathy/nanoGPT")
    if not args.dry and not torch.cuda.is_available():
        p.error("no CUDA GPU here: run with --dry to check the script on the CPU")
    c = Check(args.out, args.dry, args.nanogpt)
    for name in parts:
        t0 = time.perf_counter()
        print(f"== {name}", flush=True)
        try:
            globals()[f"part_{name}"](c)
        except Exception as e:  # recorded, and the check goes on
            traceback.print_exc()
            c.record("failed", name, error=f"{type(e).__name__}: {e}"[:2000])
        print(f"   {time.perf_counter() - t0:.0f} s", flush=True)
    print(summary(c.records))
    return 1 if any(r["bench"] == "failed" for r in c.records) else 0


if __name__ == "__main__":
    sys.exit(main())
