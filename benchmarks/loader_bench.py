"""Median time to assemble one training batch from the memory-mapped token file.

    python benchmarks/loader_bench.py [--data data/shakespeare/gpt2] [--batches 500]

Times `TokenDataset.batch(sampler.next_indices(), T)` (gather B random windows
from the memmap, int64 tensors) at B=12, T=1024 and B=64, T=1024, plus the copy
to the GPU through pinned memory when CUDA is available. Prepares the shipped
Shakespeare corpus (gpt2) on first use. Prints one JSON line per shape.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from gpt.dataset import TokenDataset, WindowSampler  # noqa: E402
from gpt.system import to_device  # noqa: E402
from gpt.prepare import ensure_prepared  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="a prepared directory (default: the shipped Shakespeare, gpt2)")
    p.add_argument("--batches", type=int, default=500)
    args = p.parse_args()
    data_dir = args.data or ensure_prepared(ROOT / "data" / "shakespeare", "gpt2")
    data = TokenDataset(data_dir, "train")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for B, T in [(12, 1024), (64, 1024)]:
        sampler = WindowSampler(data.num_windows(T), B, seed=0)
        times = []
        for i in range(args.batches + 10):
            t0 = time.perf_counter()
            x, y = to_device(data.batch(sampler.next_indices(), T), device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= 10:  # warm-up: page cache, allocator
                times.append((time.perf_counter() - t0) * 1e3)
        print(json.dumps({"bench": "loader", "batch_size": B, "seq_len": T, "device": str(device),
                          "tokens_in_split": len(data), "ms_per_batch_median": round(statistics.median(times), 4),
                          "ms_p90": round(sorted(times)[int(0.9 * len(times))], 4)}))


if __name__ == "__main__":
    main()
