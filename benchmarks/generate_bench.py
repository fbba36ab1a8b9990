"""Generation speed: new tokens/s of gpt.sampling vs transformers' GPT2LMHeadModel.generate.

    python benchmarks/generate_bench.py                       # CPU, or CUDA when available
    python benchmarks/generate_bench.py --new_tokens 128 --device cuda

The same randomly initialised GPT-2 124M weights in both; greedy, top-p sampling
(p = 0.9) and contrastive search (k = 4, alpha = 0.6), at batch 1 and 8, a
32-token prompt, fp32. Each figure is the median of --repeats timed runs after a
warm-up run. Greedy and contrastive outputs are also compared token for token.
Prints one JSON line per (method, batch) with both implementations' tokens/s.
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

METHODS = {
    "greedy": (dict(temperature=0), dict(do_sample=False)),
    "top_p_0.9": (dict(temperature=1.0, top_p=0.9), dict(do_sample=True, top_p=0.9, top_k=0)),
    "contrastive_k4_a0.6": (dict(penalty_alpha=0.6, top_k=4), dict(do_sample=False, penalty_alpha=0.6, top_k=4)),
}


def timed(fn, device, repeats):
    fn()  # warm-up
    times, out = [], None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    import transformers

    device = torch.device(args.device)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval().to(device)  # 124M shape
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = from_pretrained(tmp).eval().to(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    for batch in (1, 8):
        prompt = torch.randint(0, 50257, (batch, 32), generator=torch.Generator().manual_seed(batch)).to(device)
        mask = torch.ones_like(prompt)
        for method, (our_kw, hf_kw) in METHODS.items():
            n = args.new_tokens

            def run_ours():
                g = torch.Generator(device=device).manual_seed(0)
                return generate(ours, prompt, n, generator=g, **our_kw)

            def run_hf():
                with torch.no_grad():
                    return hf.generate(prompt, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                       pad_token_id=50256, **hf_kw)

            t_ours, out_ours = timed(run_ours, device, args.repeats)
            t_hf, out_hf = timed(run_hf, device, args.repeats)
            record = {"bench": "generate", "device": name, "method": method, "batch": batch, "new_tokens": n,
                      "ours_tokens_per_s": round(batch * n / t_ours, 1), "hf_tokens_per_s": round(batch * n / t_hf, 1),
                      "speedup": round(t_hf / t_ours, 2), "transformers": transformers.__version__}
            if method != "top_p_0.9":
                record["identical_tokens"] = out_ours.tolist() == out_hf.tolist()
            print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
