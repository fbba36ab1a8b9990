"""Checkpoints: written atomically, loaded safely, rotated.

A checkpoint is one torch.save'd dict of tensors and plain Python values (no
pickled classes), so it loads with torch.load(..., weights_only=True):

    model, optimizer, scaler     state_dicts (the model's without torch.compile's _orig_mod.)
    iter                          optimiser steps completed
    sampler                       the data sampler's state (a few integers)
    rng                           python, numpy, torch and CUDA generator states
    config, model_config          the resolved run config and the GPTConfig, as dicts
    tokenizer                     the tokenizer spec (gpt.tokenizer.from_spec rebuilds it)
    best_val_loss

In out_dir: ckpt-0001000.pt for each save (the last `keep_last` are kept),
ckpt.pt the latest and best.pt the one with the lowest validation loss (both
hard links, so no data is written twice). A file appears complete or not at all.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from gpt.atomic import atomic_path
from gpt.errors import UserError

LATEST, BEST = "ckpt.pt", "best.pt"


def rng_state() -> dict:
    """Every random generator's state, as plain Python values (lists of ints)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"keys": keys.tolist(), "pos": pos, "has_gauss": has_gauss, "gauss": gauss},
        "torch": torch.get_rng_state().tolist(),
        "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    n = state["numpy"]
    np.random.set_state(("MT19937", np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _link(src: Path, dst: Path) -> None:
    """dst becomes src's file (a hard link where the file system allows, else a copy), atomically."""
    with atomic_path(dst) as tmp:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


def save_checkpoint(state: dict, out_dir: str | Path, *, keep_last: int, is_best: bool) -> Path:
    """Write ckpt-ITER.pt, point ckpt.pt (and best.pt if is_best) at it, drop old ones."""
    out_dir = Path(out_dir)
    path = out_dir / f"ckpt-{state['iter']:07d}.pt"
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    _link(path, out_dir / LATEST)
    if is_best:
        _link(path, out_dir / BEST)
    for old in sorted(out_dir.glob("ckpt-*.pt"))[:-keep_last]:
        old.unlink()
    return path


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint's dict, tensors on the CPU. Only tensors and plain values are unpickled."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}: train first, or point to a directory that has {LATEST}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a checkpoint, or holding objects we refuse to unpickle
        raise UserError(f"cannot load checkpoint {path} ({type(e).__name__}): the file is damaged or not ours") from None


def find_checkpoint(out_dir: str | Path) -> Path:
    path = Path(out_dir) / LATEST
    if not path.is_file():
        raise UserError(f"nothing to resume: {out_dir} has no {LATEST}; start with run.init_from = \"scratch\"")
    return path


def checkpoint_path(out_dir: str | Path, ckpt: str) -> Path:
    """A command line's --ckpt: a file name inside --out_dir, unless written as a path (a/b.pt)."""
    return Path(ckpt) if Path(ckpt).parent != Path(".") else Path(out_dir) / ckpt
