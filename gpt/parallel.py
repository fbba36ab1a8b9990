"""Data parallelism over processes (DDP or FSDP2) and activation checkpointing, in one place.

    train_model = parallelize(model, procs, device, system, dtype)   # what the training step calls
    with gradient_sync(train_model, last_micro_step): loss.backward() # accumulation: reduce once
    norm = clip_grad_norm(model, max_norm)                          # the global norm, over all shards
    state = sharded_state(model, optimizers)                        # FSDP: this process's shards
    load_sharded_state(model, optimizers, state)                    # after gpt.checkpoint.read_shards

Every process trains the same model on its own share of each batch, and gradients
are averaged over processes before the optimizer step; the two engines differ in
where the model lives:

- DDP (system.parallel = "ddp"): each process keeps the whole model, its gradients
  and the AdamW state: 4 + 4 + 8 = 16 bytes per parameter before activations (the
  gradients are views into DDP's all-reduce buckets, not a second copy), so GPT-2
  XL (1.558B) needs 24.9 GB per GPU, whatever the number of GPUs.
- FSDP (system.parallel = "fsdp", PyTorch's fully_shard): each transformer block
  and the rest of the model are sharded over the processes: each keeps 1/N of
  every weight, gradient and optimizer state (16 / N bytes per parameter), gathers
  a block's full weights just before the block runs (forward and backward) and
  frees them after (system.reshard_after_forward = false keeps them from forward to
  backward: faster, more memory). Gradients are reduce-scattered: each process
  gets the average of its shard. With bf16 (system.dtype), FSDP gathers each
  weight in bf16 (half the traffic of fp32) while the sharded master weights, the
  optimizer and the gradient reduction stay fp32. That is not quite DDP's autocast:
  under FSDP the embeddings' output and the residual stream between blocks are
  bf16 tensors and the norms' weights are rounded to bf16, where DDP keeps them
  fp32 and rounds only each matmul's inputs. Losses differ by bf16 rounding
  (tests/test_parallel.py: within 1e-3 over 12 steps of a tiny model, where fp32
  runs agree within 1e-5). Keeping fp32 weights under FSDP would match DDP exactly,
  at the price of twice the gather traffic and autocast's bf16 copy of every block's
  weights held from forward to backward (2 bytes per parameter, unsharded).

Activation checkpointing (system.activation_checkpointing = "blocks") keeps only
each block's input during the forward pass and recomputes the block during
backward: activation memory of one block instead of all of them, for about a
third more compute. The
results are the same: the recomputation replays the same random numbers.

Checkpoints: DDP runs save whole tensors from the main process; FSDP runs save
each process's shards (gpt.checkpoint.write_shards). Either kind resumes with the
other engine and on another number of processes.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from gpt.errors import UserError
from gpt.system import Processes


def _fsdp():
    """(FSDPModule, MixedPrecisionPolicy, fully_shard): public since torch 2.6, in _composable before."""
    try:
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
    except ImportError:
        from torch.distributed._composable.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
    return FSDPModule, MixedPrecisionPolicy, fully_shard


def is_sharded(model: nn.Module) -> bool:
    """Whether fully_shard was applied to the model (FSDP)."""
    return isinstance(model, _fsdp()[0])


def parallelize(model: nn.Module, procs: Processes, device: torch.device, system, dtype: torch.dtype) -> nn.Module:
    """Apply activation checkpointing, FSDP sharding or DDP, and torch.compile as `system` says;
    returns the module the training step calls. FSDP shards `model` in place (its parameters
    become DTensors: build the optimizer after this); DDP wraps it."""
    compile_ = system.compile if system.compile != "auto" else device.type == "cuda"
    backbone = getattr(model, "backbone", model)  # the GPT inside a classifier
    backbone.checkpoint_blocks = system.activation_checkpointing == "blocks"
    if system.parallel == "fsdp":
        if dtype == torch.float16:
            raise UserError("system.parallel = \"fsdp\" does not train in float16 (its gradient scaler is not "
                            "sharded): use system.dtype = \"bfloat16\" or \"float32\"")
        from torch.distributed.device_mesh import init_device_mesh

        _, MixedPrecisionPolicy, fully_shard = _fsdp()
        if not dist.is_initialized():  # one process, not under torchrun: a group of one
            index = device.index if device.index is not None else torch.cuda.current_device() if device.type == "cuda" else 0
            bound = {"device_id": torch.device("cuda", index)} if device.type == "cuda" else {}
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                    world_size=1, **bound)
        # GPT.forward returns the logits as a view (vocabulary padding cut off); nothing modifies them
        # in place, which is what FSDP's warning about views is for
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        mesh = init_device_mesh(device.type, (procs.world_size,))
        policy = MixedPrecisionPolicy(param_dtype=dtype if dtype != torch.float32 else None, reduce_dtype=torch.float32)
        for block in backbone.transformer.h:
            if compile_:
                block.compile()  # in place: parameter names do not change
            fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=system.reshard_after_forward)
        fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=system.reshard_after_forward)
        return model
    compiled = torch.compile(model) if compile_ else model
    if procs.world_size == 1:
        return compiled
    # gradient_as_bucket_view: each gradient is a view into DDP's all-reduce bucket, so DDP keeps no
    # second copy of the gradients (4 bytes per parameter saved; benchmarks/parallel_memory.py)
    return DDP(compiled, device_ids=[procs.local_rank] if device.type == "cuda" else None,
               gradient_as_bucket_view=True)


def gradient_sync(train_model: nn.Module, enabled: bool):
    """Context for one micro-step's backward: with enabled False, gradients accumulate locally
    and are not averaged over processes (all but the last micro-step of a step)."""
    if isinstance(train_model, DDP) and not enabled:
        return train_model.no_sync()
    if is_sharded(train_model):
        train_model.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Scale the gradients so that their global norm is at most max_norm; -> that norm before
    clipping (over every shard of every process under FSDP)."""
    norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def sharded_state(model: nn.Module, optimizers: list[torch.optim.Optimizer] | None = None) -> dict:
    """{"model": ..., "optimizer": ...} as this process holds them (under FSDP its shards, as
    DTensors; else whole tensors), optimizer state keyed by parameter name: what
    torch.distributed.checkpoint writes, or fills when reading (gpt.checkpoint.write_shards)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizers is None:
        return {"model": get_model_state_dict(model)}
    model_state, optim_state = get_state_dict(model, optimizers)
    return {"model": model_state, "optimizer": optim_state}


def load_sharded_state(model: nn.Module, optimizers: list[torch.optim.Optimizer] | None, state: dict) -> None:
    """Put sharded_state's dicts, once filled, back into the model (and optimizer)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    if optimizers is None:
        set_model_state_dict(model, state["model"])
    else:
        set_state_dict(model, optimizers, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def load_model_state(model: nn.Module, state: dict) -> None:
    """Load whole tensors (a checkpoint's weights, read by every process) into the model; under
    FSDP each process keeps its shard."""
    if not is_sharded(model):
        model.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))


def stepped(optimizers: list[torch.optim.Optimizer]) -> bool:
    """Whether the optimizers hold state (they have taken a step; they step together: an fp16
    overflow skips them all). Before that there is none to save: PyTorch's state-dict helpers
    for several optimizers or FSDP would make some by taking a step of learning rate 0, which
    changes the run (AdamW counts it in its bias correction)."""
    return any(optimizer.state for optimizer in optimizers)


def optimizer_state(model: nn.Module, optimizers: list[torch.optim.Optimizer]) -> dict:
    """The whole optimizer state of an unsharded model, for a checkpoint: one optimizer's
    state_dict as PyTorch writes it; several (Muon and AdamW) merged into one dict keyed by
    parameter name (empty before the first step)."""
    if len(optimizers) == 1:
        return optimizers[0].state_dict()
    if not stepped(optimizers):
        return {"state": {}, "param_groups": []}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizers, options=StateDictOptions(full_state_dict=True))


def load_optimizer_state(model: nn.Module, optimizers: list[torch.optim.Optimizer], state: dict) -> None:
    """Restore a whole optimizer state (each process takes its shard): as PyTorch writes it
    (keyed by parameter number, as DDP runs save one optimizer) or keyed by parameter name.
    An empty one (saved before the first step) leaves the new optimizers as they are."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if not state["state"]:  # nothing learned yet; the settings of the param groups come from the config
        return
    if isinstance(next(iter(state["state"])), int):
        names = {id(p): name for name, p in model.named_parameters()}
        order = [names[id(p)] for group in optimizers[0].param_groups for p in group["params"]]
        state = {"state": {order[i]: s for i, s in state["state"].items()},
                 "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizers, state, options=StateDictOptions(full_state_dict=True))