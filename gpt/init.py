"""run.init_from -> the GPT a run starts from, and its tokenizer. Every task uses this.

    start = initial_model(cfg, scratch_tokenizer=lambda: tokenizer, vocab_source="data/x")
    start.model        a GPT (weights loaded, except for "resume": the trainer restores everything)
    start.tokenizer    the tokenizer its token ids belong to
    start.checkpoint   the checkpoint being resumed (init_from = "resume"), else None
    start.source       where it came from, for messages
    start.objective    what its weights were trained to predict (gpt/objectives.py): "causal"
                       unless our checkpoint says "mlm" or "prefix"

    start = with_tokens(start, ["mask"])   # added tokens (gpt.tokenizer.with_added), new embeddings

run.init_from is one of:

    scratch            a new GPT of cfg.model, with the vocabulary of the task's tokenizer
    resume             the run in run.out_dir, from its ckpt.pt (the checkpoint's architecture)
    a run directory    a language model of ours (best.pt, else ckpt.pt), or a .pt file
    gpt2 ... gpt2-xl   Hugging Face GPT-2 weights (a hub id or owner/name: needs the network;
                       or a local directory), with GPT-2's tokenizer, or the one that
                       gpt.hf.save_pretrained recorded beside an export of ours

Model settings written in the config must agree with weights loaded from
elsewhere (the one line names the field), except model.dropout, which may change,
and model.block_size, which may shrink (a learned position table is cropped) and,
for positions that extrapolate (all but learned), grow: nothing in those models
is sized by block_size.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from gpt.checkpoint import (BEST, LATEST, check_task, find_checkpoint, gpt_from_checkpoint, hf_language_model,
                            load_checkpoint, load_weights)
from gpt.errors import UserError
from gpt.hf import HUB_MODELS
from gpt.model import GPT, GPTConfig
from gpt.system import check_fits
from gpt.tokenizer import Tokenizer, from_spec, with_added

@dataclass
class Start:
    model: GPT
    tokenizer: Tokenizer
    checkpoint: dict | None  # the checkpoint resumed, if any
    source: str
    objective: str = "causal"


def initial_model(cfg, *, scratch_tokenizer: Callable[[], Tokenizer], vocab_source: str,
                  scratch_if_missing: bool = False, note: Callable[[str], None] = print, device=None) -> Start:
    """The GPT that run.init_from names (see the module docstring). cfg: a gpt.config.Config.

    scratch_tokenizer: the task's tokenizer for a model trained from scratch (called only then);
    vocab_source: where that vocabulary comes from, for messages; scratch_if_missing: a
    run.init_from that names a missing local path trains from scratch (with a note); device:
    where it will train (a model too large to train there is refused before it is allocated).
    """
    device = torch.device(device or "cpu")
    init = cfg.run.init_from
    kind = init_kind(init, scratch_if_missing)
    if kind == "missing":
        if not scratch_if_missing:
            raise UserError(f"run.init_from {init!r} does not exist: name a run directory with a checkpoint, a .pt "
                            f"file, a Hugging Face GPT-2 or \"scratch\"")
        note(f"note: {init} does not exist: training from scratch")
        kind = "scratch"

    if kind == "scratch":
        tokenizer = scratch_tokenizer()
        if cfg.is_set("model.vocab_size") and cfg.model.vocab_size != tokenizer.vocab_size:
            raise UserError(f"model.vocab_size = {cfg.model.vocab_size}, but {vocab_source} has {tokenizer.vocab_size} "
                            f"token ids: remove model.vocab_size (it comes from the tokenizer) or use the right tokenizer")
        config = replace(cfg.model, vocab_size=tokenizer.vocab_size)
        check_fits(config.parameter_count(), device)
        return Start(GPT(config), tokenizer, None, "scratch")

    if kind == "resume":
        path = find_checkpoint(cfg.run.out_dir, note)
        ckpt = load_checkpoint(path)
        check_task(ckpt, path, cfg.run.task)
        check_fits(GPTConfig(**ckpt["model_config"]).parameter_count(), device, f"the model in {path}")
        model = _checked(gpt_from_checkpoint(ckpt, _dropout(cfg)), cfg, f"the checkpoint in {cfg.run.out_dir}",
                         may_resize=False)
        return Start(model, from_spec(ckpt["tokenizer"]), ckpt, str(path), ckpt.get("objective", "causal"))

    if kind == "checkpoint":  # a language model of ours: its weights
        path = our_checkpoint(init)
        ckpt = load_checkpoint(path)
        check_task(ckpt, path, "lm", hint="start from a language model's run directory or .pt file")
        check_fits(GPTConfig(**ckpt["model_config"]).parameter_count(), device, f"the model in {path}")
        model = gpt_from_checkpoint(ckpt, _dropout(cfg))
        load_weights(model, ckpt, path)
        note(f"backbone: the language model in {path} (iteration {ckpt['iter']})")
        return Start(_checked(model, cfg, str(path)), from_spec(ckpt["tokenizer"]), None, str(path),
                     ckpt.get("objective", "causal"))

    model, tokenizer = hf_language_model(init, dropout=cfg.model.dropout)  # Hugging Face GPT-2 (or an export of ours)
    return Start(_checked(model, cfg, init), tokenizer, None, init)


def with_tokens(start: Start, names: list[str]) -> Start:
    """`start` with the added tokens `names` in its tokenizer and model (new ones get new embeddings)."""
    tokenizer = with_added(start.tokenizer, names)
    if tokenizer.vocab_size > start.model.config.vocab_size:
        start.model.grow_vocab(tokenizer.vocab_size)
    return replace(start, tokenizer=tokenizer)


def init_kind(init: str, scratch_if_missing: bool = False) -> str:
    """scratch | resume | checkpoint (ours) | hf | missing (a path that does not exist).

    A name that is neither here nor a GPT-2 size is a hub id (owner/name) to download,
    unless it is written like a file path (./x, /x, ~/x, a/b/c, x.pt), or scratch_if_missing
    is on: then it is a missing local run (e.g. out/shakespeare_gpt2 on a fresh clone).
    """
    if init in ("scratch", "resume"):
        return init
    if our_checkpoint(init) is not None:
        return "checkpoint"
    if init in HUB_MODELS or Path(init).exists():
        return "hf"
    looks_local = init.startswith((".", "/", "~")) or init.count("/") > 1 or init.endswith(".pt")
    return "missing" if looks_local or scratch_if_missing else "hf"


def our_checkpoint(init: str) -> Path | None:
    """Our checkpoint named by run.init_from: a .pt file, or a run directory (best.pt, else ckpt.pt)."""
    path = Path(init)
    if path.is_file() and path.suffix == ".pt":
        return path
    for name in (BEST, LATEST):
        if (path / name).is_file():
            return path / name
    return None


def _dropout(cfg) -> float | None:
    """model.dropout if the config sets it (it wins over the checkpoint's), else None."""
    return cfg.model.dropout if cfg.is_set("model.dropout") else None


def _checked(model: GPT, cfg, source: str, may_resize: bool = True) -> GPT:
    """Give the model an explicit model.block_size (if allowed; see GPT.set_block_size), then
    refuse any other model field that the config sets differently from the weights."""
    if may_resize and cfg.is_set("model.block_size") and cfg.model.block_size != model.config.block_size:
        try:
            model.set_block_size(cfg.model.block_size)
        except UserError as e:
            raise UserError(f"{source}: model.{e}") from None
    for field in sorted(cfg.set_keys("model") - {"dropout"}):
        ours, theirs = getattr(cfg.model, field), getattr(model.config, field)
        if ours != theirs:
            raise UserError(f"{source} has model.{field} = {theirs}, but the config says {ours}: "
                            f"remove model.{field} from the config, or start a new run.out_dir")
    return model
