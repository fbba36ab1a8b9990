"""The optimisers and the learning-rate schedule.

    optimizers = make_optimizers(model, cfg.optim, device)   # one or two torch optimisers
    set_lr(optimizers, lr_at(it, cfg.optim, cfg.run.max_iters) / cfg.optim.lr)

optim.name = "adamw": AdamW on every parameter, weight decay on matrices and embeddings
(dim >= 2), not on biases and norms: GPT-2's recipe.

optim.name = "muon": Muon (torch.optim.Muon, torch >= 2.9) for the 2-D weight matrices
inside the transformer blocks (attention and MLP projections), at optim.muon_lr; AdamW, as
above, for everything else (token and position embeddings, the tied head, norms, biases,
a classifier's head), at optim.lr. Muon keeps a momentum of the gradient, as SGD does, and
replaces each matrix's update by an approximation of the nearest semi-orthogonal matrix
(five Newton-Schulz iterations: singular values pushed to roughly 0.6-1.2): every direction
of the update gets about the same size, so the rarely-pushed directions learn as fast as
the common ones. Embeddings and the head are lookups and a
classifier over the vocabulary, not linear maps between hidden spaces, and stay with AdamW
(Keller Jordan's Muon notes; nanochat and modded-nanogpt split the same way). Newton-Schulz
needs each matrix whole, so Muon does not run on FSDP's shards (refused); DDP is fine (every
process holds the whole averaged gradient and computes the same update).

The schedule (lr_at) gives optim.lr's value at each iteration; every parameter group follows
it in proportion (set_lr), so a schedule shapes Muon's and AdamW's rates alike.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from gpt.config import OptimConfig
from gpt.errors import UserError


def lr_at(it: int, optim: OptimConfig, max_iters: int) -> float:
    """The learning rate of iteration `it`: linear warmup, then cosine, constant or WSD."""
    if it < optim.warmup_iters:
        return optim.lr * (it + 1) / (optim.warmup_iters + 1)
    if optim.schedule == "constant":
        return optim.lr
    if optim.schedule == "wsd":  # stable at lr, then a linear decay to min_lr over the last decay_iters
        decay = optim.decay_iters or max(1, round(0.2 * max_iters))
        progress = min(1.0, max(0.0, (it - (max_iters - decay)) / decay))
        return optim.lr - progress * (optim.lr - optim.min_lr)
    end = optim.decay_iters or max_iters  # cosine from lr to min_lr between warmup and end
    if it >= end:
        return optim.min_lr
    progress = (it - optim.warmup_iters) / max(1, end - optim.warmup_iters)
    return optim.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (optim.lr - optim.min_lr)


def set_lr(optimizers: list[torch.optim.Optimizer], scale: float) -> None:
    """Every group at `scale` times its peak rate (lr_at(...) / optim.lr)."""
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = group["peak_lr"] * scale


def muon_matrices(model: nn.Module) -> list[nn.Parameter]:
    """The trainable 2-D weights inside the transformer blocks (of a classifier's backbone too)."""
    blocks = getattr(model, "backbone", model).transformer.h
    return [p for p in blocks.parameters() if p.requires_grad and p.dim() == 2]


def make_optimizers(model: nn.Module, optim: OptimConfig, device: torch.device) -> list[torch.optim.Optimizer]:
    """[AdamW] or [Muon, AdamW] over the model's trainable parameters (see the module's notes)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizers = []
    if optim.name == "muon":
        if not hasattr(torch.optim, "Muon"):
            raise UserError(f'optim.name = "muon" needs torch >= 2.9 (torch.optim.Muon); this is torch '
                            f'{torch.__version__}: upgrade torch, or train with optim.name = "adamw"')
        matrices = muon_matrices(model)
        if any(hasattr(p, "device_mesh") for p in matrices):
            raise UserError('optim.name = "muon" does not run under system.parallel = "fsdp" (Newton-Schulz needs '
                            'each weight matrix whole, FSDP holds shards): use system.parallel = "ddp", or '
                            'optim.name = "adamw"')
        if matrices:
            optimizers.append(torch.optim.Muon(
                [{"params": matrices, "peak_lr": optim.muon_lr}], lr=optim.muon_lr,
                weight_decay=optim.weight_decay, momentum=optim.muon_momentum))
            taken = {id(p) for p in matrices}
            params = [p for p in params if id(p) not in taken]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": optim.weight_decay, "peak_lr": optim.lr},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "peak_lr": optim.lr},
    ]
    optimizers.append(torch.optim.AdamW(groups, lr=optim.lr,
                                        betas=(optim.beta1, optim.beta2), fused=device.type == "cuda"))
    return optimizers
