"""Where and how code runs: device, precision, processes, and what the hardware can do.

    device = pick_device("auto")                 # cuda, then mps, then cpu
    dtype = pick_dtype("auto", device)           # bf16 on GPUs that have it, fp16 on older ones, fp32 on CPU
    with autocast(device, dtype): ...            # mixed precision, or nothing for fp32
    procs = start_processes(device)              # rank / local_rank / world_size under torchrun
    x, y = to_device(batch, device)              # pinned, asynchronous copies on CUDA

Training, sampling, evaluation and classification all import their device and
precision choices from here, so inference commands never load the trainer.
This module also holds the dense bf16 peak FLOP/s of known GPUs, which turns a
measured tokens/s into model FLOPs utilisation (MFU).
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from gpt.errors import UserError

# ---- device and precision -------------------------------------------------------------------


def pick_device(name: str, setting: str = "--device") -> torch.device:
    """"auto" (cuda, then mps, then cpu) or a torch device name; under torchrun, this process's GPU.
    A device is refused unless a number can be stored on it and read back: not one this machine
    lacks (cuda:7), nor one that holds no data (meta: shapes only). setting: what named the device,
    for the error message."""
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    try:
        device = torch.device(name)
        if device.type == "cuda" and "RANK" in os.environ:
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.ones(1, device=device).cpu()  # meta creates tensors but cannot give their values back
    except (RuntimeError, AssertionError, NotImplementedError) as e:
        raise UserError(f"{setting} {name!r} is not usable here ({str(e).splitlines()[0]}): use \"auto\" or \"cpu\"") from None
    return device


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bf16 autocast on GPUs that support it, else fp16 (with a grad scaler); fp32 elsewhere."""
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return getattr(torch, name)


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision in `dtype` on `device` (weights stay fp32); a no-op for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def to_device(batch: tuple[torch.Tensor, ...], device: torch.device | str) -> tuple[torch.Tensor, ...]:
    """Tensors to the device; on CUDA through pinned memory, without waiting for the copy."""
    device = torch.device(device)
    if device.type == "cuda":
        return tuple(t.pin_memory().to(device, non_blocking=True) for t in batch)
    return tuple(t.to(device) for t in batch)


def available_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on `device`: free GPU memory, or the RAM the operating
    system says is available (None where unknown)."""
    if device.type == "cuda":  # free on the device, and what PyTorch's allocator holds unused
        return torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                fields = dict(line.split(":", 1) for line in f)
            return int(fields["MemAvailable"].split()[0]) * 1024
        except (OSError, KeyError, ValueError):
            try:
                return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            except (ValueError, OSError, AttributeError):
                return None
    return None


def check_memory(need: int, device: torch.device, work: str, advice: str | Callable[[int], str]) -> None:
    """Refuse, before allocating, `work` that needs about `need` bytes more than `device` has free
    (where that is known: CUDA, and the CPU's available RAM), with one line: what it needs, what
    is free, and `advice` (or advice(free bytes), for advice that depends on what is free).
    Training, evaluation, attention maps and generation all check their estimates here."""
    free = available_memory(device)
    if free is not None and need > free:
        advice = advice(free) if callable(advice) else advice
        raise UserError(f"{work} needs about {need / 2**30:,.1f} GiB, but {device} has {free / 2**30:,.1f} GiB free: "
                        f"{advice}")


TRAINING_BYTES_PER_PARAMETER = 16  # fp32 weights, gradients, and AdamW's two moments


def check_fits(parameters: int, device: torch.device, what: str = "the model") -> None:
    """Refuse, before allocating, a model whose weights, gradients and optimiser state alone
    (16 bytes per parameter; activations come on top) exceed what `device` has free."""
    check_memory(parameters * TRAINING_BYTES_PER_PARAMETER, device,
                 f"training {what} ({parameters / 1e9:.2f}B parameters: weights, gradients and AdamW state, 16 bytes "
                 f"each, before activations)", "make the model smaller (n_layer, n_embd)")


# ---- processes (torchrun) ------------------------------------------------------------------------


@dataclass
class Processes:
    rank: int = 0  # this process among all of them
    local_rank: int = 0  # this process on its machine (picks the GPU)
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def note(self, line: str) -> None:
        """Print a line once (from the main process), not once per process."""
        if self.is_main:
            print(line)


def start_processes(device: torch.device) -> Processes:
    """Join the process group when launched by torchrun (it sets RANK, LOCAL_RANK, WORLD_SIZE)."""
    if "RANK" not in os.environ:
        return Processes()
    procs = Processes(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]))
    if device.type == "cuda":
        torch.cuda.set_device(procs.local_rank)
        # bound to its GPU: NCCL need not guess the device from the rank (nor warn that it did)
        dist.init_process_group(backend="nccl", device_id=torch.device("cuda", procs.local_rank))
    else:
        dist.init_process_group(backend="gloo")
    return procs


def barrier() -> None:
    """Wait for every process (nothing to wait for in a single process)."""
    if dist.is_initialized():
        dist.barrier()


def finish_processes() -> None:
    """Leave the process group together, after the last collective (nothing to do in one process).

    A barrier alone is not enough with gloo: the first process out of it may close its
    sockets while a peer still reads the barrier's last message, and the peer's gloo thread
    then dies with "Connection reset/closed by peer" (SIGABRT), most often on a loaded
    machine. So every process also checks in on the rendezvous store (a separate
    connection) and waits until all have returned from the barrier before tearing down.
    A DDP wrapper the caller let go of lives on in a reference cycle (its reducer's hooks
    point back at it) and holds the process group: it is collected here, while the
    interpreter is whole, not during its shutdown.
    """
    if not dist.is_initialized():
        return
    dist.barrier()
    store = getattr(dist.distributed_c10d, "_get_default_store", lambda: None)()
    if store is not None and dist.get_world_size() > 1:
        store.add("gpt/finished", 1)
        deadline = time.monotonic() + 60  # a peer that died after the barrier must not hang us
        while int(store.add("gpt/finished", 0)) < dist.get_world_size() and time.monotonic() < deadline:
            time.sleep(0.01)
    gc.collect()
    dist.destroy_process_group()


def exit_worker() -> None:
    """End a process that torchrun started, once its work is written: skip the interpreter's
    shutdown (outside torchrun, return).

    That shutdown frees what the distributed engine still holds in no set order, and a gloo
    thread that reaches for the interpreter while it is torn down aborts the process
    ("terminate called without an active exception", SIGABRT) after a run that succeeded:
    rare, on loaded machines, and it turns a good run's exit status into a failure.
    """
    if "RANK" in os.environ:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all processes, in place (gloo has no AVG, so callers divide)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


# ---- peak FLOP/s -------------------------------------------------------------------------------

# Dense bf16 tensor-core peaks (FLOP/s, no sparsity) from NVIDIA's datasheets, matched
# against torch.cuda.get_device_name(); the first match wins, so specific names come first.
PEAK_BF16_FLOPS = (
    ("H200 NVL", 835e12),
    ("H200", 989e12),  # H200 SXM, GH200
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # H100 SXM ("NVIDIA H100 80GB HBM3")
    ("A100", 312e12),  # SXM and PCIe
)


def peak_bf16_flops(device_name: str) -> float | None:
    for key, flops in PEAK_BF16_FLOPS:
        if key in device_name:
            return flops
    return None


def device_peak_flops(device=None) -> float | None:
    """Dense bf16 peak of a torch device (default: the current CUDA device), or None."""
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda":
        return None
    return peak_bf16_flops(torch.cuda.get_device_name(device))
