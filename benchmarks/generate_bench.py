"""Generation speed: new tokens/s of gpt.sampling (eager and compiled) vs transformers' generate.

    python benchmarks/generate_bench.py                      # every case, CPU (or CUDA when available)
    python benchmarks/generate_bench.py --cases char_greedy,gpt2_greedy --repeats 7
    python benchmarks/generate_bench.py --device cuda --dtype bfloat16

Both implementations get the same randomly initialised GPT-2 weights (the 124M
shape, or a 6-layer 384-wide character model: nanoGPT's Shakespeare shape, larger
than the Quickstart's 4x128), a 32-token
prompt, and must produce the same number of new tokens. Runs of ours (eager),
ours (compiled: compile=True) and transformers are interleaved, after a warm-up
run each; figures are medians of --repeats runs, steady state. The compiled
path's first call (its compile time) is reported separately. Deterministic
methods are also compared token for token. For greedy decoding at batch 1 the
memory-bandwidth roofline is printed beside it: the measured read bandwidth of
this machine divided by the bytes of weights each token reads.

One JSON line per case, then a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gpt.hf import from_pretrained  # noqa: E402
from gpt.sampling import generate  # noqa: E402

SHAPES = {  # transformers.GPT2Config arguments
    "char": dict(n_layer=6, n_head=6, n_embd=384, vocab_size=65, n_positions=256),
    "gpt2": dict(),  # 124M
}
METHODS = {  # (ours, transformers)
    "greedy": (dict(temperature=0), dict(do_sample=False)),
    "contrastive": (dict(penalty_alpha=0.6, top_k=4), dict(do_sample=False, penalty_alpha=0.6, top_k=4)),
    "beam4": (dict(num_beams=4), dict(do_sample=False, num_beams=4)),
    "top_p": (dict(temperature=1.0, top_p=0.9), dict(do_sample=True, top_p=0.9, top_k=0)),
}
CASES = {  # name: (shape, method, batch, new tokens)
    "char_greedy": ("char", "greedy", 1, 192),
    "gpt2_greedy": ("gpt2", "greedy", 1, 64),
    "gpt2_contrastive": ("gpt2", "contrastive", 1, 64),
    "gpt2_contrastive_b8": ("gpt2", "contrastive", 8, 32),
    "gpt2_beam4": ("gpt2", "beam4", 1, 64),
    "gpt2_top_p": ("gpt2", "top_p", 1, 64),
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def seconds(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def read_bandwidth(device) -> float:
    """Bytes/s of reading a buffer far larger than any cache (median of 5 sums)."""
    buf = torch.ones(256 * 2**20, device=device)  # 1 GiB of fp32
    buf.sum()
    return buf.numel() * 4 / statistics.median(seconds(buf.sum, device)[0] for _ in range(5))


def weight_bytes(model) -> int:
    """Bytes one decoding step reads: every weight once (the position table is only indexed)."""
    return sum(p.numel() * p.element_size() for name, p in model.named_parameters() if "wpe" not in name)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from: {', '.join(CASES)}")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no_compile", action="store_true", help="skip the compiled runs")
    args = p.parse_args()
    import transformers

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    bandwidth = read_bandwidth(device)
    models, rows = {}, []
    for case in args.cases.split(","):
        shape, method, batch, n = CASES[case]
        if shape not in models:
            torch.manual_seed(0)
            hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**SHAPES[shape])).eval()
            with tempfile.TemporaryDirectory() as tmp:
                hf.save_pretrained(tmp)
                ours = from_pretrained(tmp).eval()
            models[shape] = hf.to(device, dtype), ours.to(device, dtype)
        hf, ours = models[shape]
        vocab = ours.config.vocab_size
        prompt = torch.randint(0, vocab, (batch, 32), generator=torch.Generator().manual_seed(batch)).to(device)
        our_kw, hf_kw = METHODS[method]
        runs = {
            "ours": lambda: generate(ours, prompt, n, generator=torch.Generator(device).manual_seed(0), compile=False,
                                     **our_kw),
            "ours_compiled": lambda: generate(ours, prompt, n, generator=torch.Generator(device).manual_seed(0),
                                              compile=True, **our_kw),
            "transformers": lambda: hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                                                min_new_tokens=n, pad_token_id=vocab - 1, **hf_kw),
        }
        if args.no_compile:
            del runs["ours_compiled"]
        first, times, outputs = {}, {k: [] for k in runs}, {}
        with torch.no_grad():
            for k, fn in runs.items():  # warm-up; the compiled path compiles here
                first[k], outputs[k] = seconds(fn, device)
            for _ in range(args.repeats):
                for k, fn in runs.items():
                    times[k].append(seconds(fn, device)[0])
        tps = {k: batch * n / statistics.median(t) for k, t in times.items()}
        record = {"bench": "generate", "case": case, "device": name, "dtype": args.dtype, "batch": batch,
                  "new_tokens": n, "torch": torch.__version__, "transformers": transformers.__version__,
                  **{f"{k}_tokens_per_s": round(v, 1) for k, v in tps.items()},
                  "speedup": round(tps["ours"] / tps["transformers"], 2)}
        if "ours_compiled" in runs:
            record["compiled_speedup"] = round(tps["ours_compiled"] / tps["transformers"], 2)
            record["compile_s"] = round(first["ours_compiled"] - statistics.median(times["ours_compiled"]), 1)
        if method != "top_p":
            record["identical_tokens"] = all(outputs[k].tolist() == outputs["transformers"].tolist() for k in runs)
        if method == "greedy" and batch == 1:
            record["roofline_tokens_per_s"] = round(bandwidth / weight_bytes(ours), 1)
            record["read_GB_per_s"] = round(bandwidth / 1e9, 1)
            # bandwidth utilisation: bytes of weights read per token x tokens/s / measured bandwidth
            fastest = tps.get("ours_compiled", tps["ours"])
            record["roofline_fraction"] = round(fastest * weight_bytes(ours) / bandwidth, 3)
        print(json.dumps(record), flush=True)
        rows.append(record)
    print("\n| case | ours | compiled | transformers | ours / theirs | compiled / theirs | compile s | same tokens |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} (batch {r['batch']}) | {r['ours_tokens_per_s']} | {r.get('ours_compiled_tokens_per_s', '-')} | "
              f"{r['transformers_tokens_per_s']} | {r['speedup']} | {r.get('compiled_speedup', '-')} | "
              f"{r.get('compile_s', '-')} | {r.get('identical_tokens', '(random)')} |")


if __name__ == "__main__":
    main()
