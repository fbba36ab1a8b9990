"""Speed of the training step for a config: ms/iter, tokens/s, peak memory, MFU.

    python benchmarks/train_bench.py configs/gpt2_124m.toml --synthetic --batch_size=16
    python benchmarks/train_bench.py configs/shakespeare_char.toml --system.dtype=bfloat16

Builds the real Trainer (same model, optimiser, precision, compile setting and
data path as train.py) and times `Trainer.step`, one optimiser step with its
gradient accumulation, after warm-up (which includes torch.compile's). With
--synthetic the data is random tokens of GPT-2's vocabulary written to a
temporary directory, so a config whose corpus is not prepared here can be
measured. Prints one JSON line (and each step's time on stderr as it goes).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gpt.config import load_config  # noqa: E402
from gpt.optim import lr_at  # noqa: E402
from gpt.trainer import Trainer  # noqa: E402


def synthetic_data(directory: Path, vocab_size: int = 50257, tokens: int = 20_000_000) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", tokens), ("val", tokens // 20)):
        rng.integers(0, vocab_size, n, dtype=np.uint16).tofile(directory / f"{split}.bin")
    meta = {"format_version": 1, "tokenizer": {"name": "gpt2"}, "vocab_size": vocab_size, "dtype": "uint16",
            "eot_token": vocab_size - 1, "train": {"tokens": tokens}, "val": {"tokens": tokens // 20}}
    (directory / "meta.json").write_text(json.dumps(meta))
    return directory


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config")
    p.add_argument("--synthetic", action="store_true", help="random GPT-2 tokens instead of the config's data")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    args, overrides = p.parse_known_args()

    with tempfile.TemporaryDirectory() as tmp:
        extra = [f"--run.out_dir={tmp}/out", "--log.plot=false"]
        if args.synthetic:
            extra.append(f"--data.dir={synthetic_data(Path(tmp))}")
        cfg = load_config(args.config, overrides + extra)
        trainer = Trainer(cfg)
        device = trainer.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for i in range(args.warmup + args.iters):
            trainer.tokens_since_log = 0
            t0 = time.perf_counter()
            loss, _, _ = trainer.step(lr_at(i, cfg.optim, cfg.run.max_iters))  # .tolist() inside waits for the GPU
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
            phase = f"warm-up {i + 1}/{args.warmup}" if i < args.warmup else f"step {i + 1 - args.warmup}/{args.iters}"
            print(f"{phase}: {(time.perf_counter() - t0) * 1e3:,.0f} ms", file=sys.stderr, flush=True)  # progress
        tokens_per_step = trainer.tokens_since_log
        seconds = statistics.median(times)
        tokens_per_sec = tokens_per_step / seconds
        mfu = trainer.model.estimate_mfu(tokens_per_sec / trainer.procs.world_size, device)
        print(json.dumps({
            "bench": "train_step", "config": args.config, "overrides": overrides,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
            "dtype": str(trainer.dtype).removeprefix("torch."), "compile": trainer.compiled is not trainer.model,
            "params_m": round(trainer.model.num_params() / 1e6, 2), "tokens_per_step": tokens_per_step,
            "ms_per_iter_median": round(seconds * 1e3, 2), "tokens_per_sec": round(tokens_per_sec),
            "peak_mem_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
            "mfu": None if mfu is None else round(mfu, 4), "last_loss": round(loss, 4),
        }))


if __name__ == "__main__":
    main()
