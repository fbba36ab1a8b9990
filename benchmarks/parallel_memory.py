"""Peak memory per process of DDP vs FSDP (and activation checkpointing) on CPU, 2 processes.

    python benchmarks/parallel_memory.py                 # launches the runs below with torchrun
    python benchmarks/parallel_memory.py --n_layer 12 --n_embd 768

For each setting, trains the same model (random data, a few steps of AdamW) under
`torchrun --nproc_per_node=2` and reports each process's peak resident set size
(ru_maxrss) and its resident set size after the last step, each minus what the
process held before building the model, and the megabytes of tensors it keeps
for training after a step (its weights, gradients and AdamW state; under FSDP,
its shards). One JSON line per setting. "ddp-copy" is DDP without
gradient_as_bucket_view, for comparison: its all-reduce buckets keep a second
copy of every gradient, which "held" does not count but the RSS shows.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

# "ddp-copy" is DDP as gpt.parallel built it before it passed gradient_as_bucket_view=True: the
# all-reduce buckets then hold a second copy of every gradient
SETTINGS = [("ddp-copy", "none"), ("ddp", "none"), ("fsdp", "none"), ("ddp", "blocks"), ("fsdp", "blocks")]


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def resident_mb() -> float:
    """The resident set size now (Linux), not the peak."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def held_mb(model, optimizer) -> float:
    """MB of the tensors this process holds for training: its parameters, their gradients and the
    optimizer's state (for FSDP's DTensors, the local shard)."""
    import torch

    def local(t):
        return t.to_local() if hasattr(t, "to_local") else t

    tensors = [local(p) for p in model.parameters()] + [local(p.grad) for p in model.parameters() if p.grad is not None]
    tensors += [local(v) for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from gpt import GPT, GPTConfig
    from gpt.config import SystemConfig
    from gpt.parallel import clip_grad_norm, parallelize
    from gpt.system import start_processes

    procs = start_processes(torch.device("cpu"))
    before, before_rss = peak_mb(), resident_mb()
    torch.manual_seed(0)
    config = GPTConfig(block_size=args.block_size, vocab_size=args.vocab_size, n_layer=args.n_layer,
                       n_head=args.n_embd // 64, n_embd=args.n_embd)
    model = GPT(config)
    if args.parallel == "ddp-copy":
        train_model = torch.nn.parallel.DistributedDataParallel(model)  # gradient_as_bucket_view=False
    else:
        system = SystemConfig(parallel=args.parallel, activation_checkpointing=args.checkpointing, compile=False)
        train_model = parallelize(model, procs, torch.device("cpu"), system, torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for _ in range(3):
        idx = torch.randint(0, args.vocab_size, (args.batch_size, args.block_size))
        _, loss = train_model(idx, idx)
        loss.backward()
        clip_grad_norm(model, 1.0)
        optimizer.step()
        held = held_mb(model, optimizer)  # weights, gradients and AdamW state this process keeps
        optimizer.zero_grad(set_to_none=True)
    peaks, helds, residents = [None] * procs.world_size, [None] * procs.world_size, [None] * procs.world_size
    dist.all_gather_object(peaks, round(peak_mb() - before))
    dist.all_gather_object(helds, round(held))
    dist.all_gather_object(residents, round(resident_mb() - before_rss))
    if procs.is_main:
        n = sum(p.numel() for p in model.parameters())
        print(json.dumps({"bench": "parallel_memory", "parallel": args.parallel, "activation_checkpointing":
                          args.checkpointing, "processes": procs.world_size, "parameters_M": round(n / 1e6, 1),
                          "batch": args.batch_size, "block_size": args.block_size, "vocab_size": args.vocab_size,
                          "held_MB_per_process": helds, "peak_rss_MB_per_process": peaks,
                          "rss_after_MB_per_process": residents,
                          "torch": torch.__version__}), flush=True)
    dist.barrier()
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n_layer", type=int, default=12)
    p.add_argument("--n_embd", type=int, default=768)
    p.add_argument("--vocab_size", type=int, default=256)  # small: the weights, not the logits, dominate
    p.add_argument("--block_size", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=2)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--parallel", default="ddp", help=argparse.SUPPRESS)
    p.add_argument("--checkpointing", default="none", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    sizes = [f"--n_layer={args.n_layer}", f"--n_embd={args.n_embd}", f"--vocab_size={args.vocab_size}",
             f"--block_size={args.block_size}", f"--batch_size={args.batch_size}"]
    for parallel, checkpointing in SETTINGS:
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
                        "--worker", f"--parallel={parallel}", f"--checkpointing={checkpointing}", *sizes],
                       check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


if __name__ == "__main__":
    main()
