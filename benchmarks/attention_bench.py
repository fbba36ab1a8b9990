"""Fused SDPA attention vs plain softmax(QKᵀ/√d)V: one training step (forward + backward).

    python benchmarks/attention_bench.py                       # GPT-2 124M, B=8, T=1024, bf16 on CUDA
    python benchmarks/attention_bench.py --device cpu --batch_size 1 --seq_len 256 --dtype float32
    python benchmarks/attention_bench.py --arch position=alibi attention_window=256   # the switches' masks and biases

Builds the same model twice with the same weights, once with the model's own
attention (torch's scaled_dot_product_attention: flash / memory-efficient
kernels on GPU) and once with attention written out as matmul-softmax-matmul
(the model's own inspection path, CausalSelfAttention.attend_explicitly), checks
that both give the same loss, and prints one JSON line per figure: median ms per
step, tokens/s and peak GPU memory of each, then their ratio. --arch sets
architecture switches (GPTConfig fields): a window or ALiBi reaches SDPA as an
explicit mask or bias instead of is_causal, which is what this measures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from gpt.model import GPT, GPTConfig  # noqa: E402


def switch(text: str) -> tuple[str, object]:
    """'position=alibi' -> ('position', 'alibi'); numbers become numbers."""
    key, value = text.split("=", 1)
    for kind in (int, float):
        try:
            return key, kind(value)
        except ValueError:
            pass
    return key, value


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(model, x, y, device, dtype, warmup, steps):
    """Median milliseconds of forward + backward, and the loss of the first step."""
    times, first_loss = [], None
    for i in range(warmup + steps):
        sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            _, loss = model(x, y)
        loss.backward()
        sync(device)
        if i == 0:
            first_loss = loss.item()
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
        model.zero_grad(set_to_none=True)
    return statistics.median(times), first_loss


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--seq_len", type=int, default=1024)
    p.add_argument("--n_layer", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--arch", nargs="*", type=switch, default=[], metavar="FIELD=VALUE",
                   help="architecture switches, e.g. position=alibi attention_window=256 n_kv_head=4")
    args = p.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"

    torch.manual_seed(0)
    config = GPTConfig(n_layer=args.n_layer, block_size=max(1024, args.seq_len), **dict(args.arch))  # GPT-2 124M shape
    model = GPT(config).to(device)
    x = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len), device=device)
    y = torch.roll(x, -1, 1)

    results = {}
    for impl in ("sdpa", "plain"):
        if impl == "plain":
            for block in model.transformer.h:
                block.attn.attend = block.attn.attend_explicitly
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        ms, loss = time_steps(model, x, y, device, dtype, args.warmup, args.steps)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        results[impl] = dict(ms=ms, loss=loss)
        print(json.dumps({
            "bench": "attention_train_step", "impl": impl, "device": name, "dtype": args.dtype,
            "batch_size": args.batch_size, "seq_len": args.seq_len, "n_layer": args.n_layer, "arch": dict(args.arch),
            "ms_per_step_median": round(ms, 2), "tokens_per_sec": round(args.batch_size * args.seq_len / ms * 1e3),
            "peak_mem_gib": None if peak is None else round(peak, 2), "loss": round(loss, 4),
        }))
    print(json.dumps({
        "bench": "attention_train_step", "device": name, "dtype": args.dtype,
        "speedup_sdpa_over_plain": round(results["plain"]["ms"] / results["sdpa"]["ms"], 2),
        "loss_abs_diff": round(abs(results["plain"]["loss"] - results["sdpa"]["loss"]), 5),
    }))


if __name__ == "__main__":
    main()
