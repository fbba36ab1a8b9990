"""Checkpoints: the layout, written atomically, loaded safely, rotated, turned back into models.

    model, tokenizer, ckpt = load_model("out/shakespeare_char/ckpt.pt")          # a language model
    model, tokenizer, ckpt = load_model("out/sms_spam/best.pt", task="classify")  # a classifier

A checkpoint is one torch.save'd dict of tensors and plain Python values (no
pickled classes), so it loads with torch.load(..., weights_only=True).

    format_version     1, or 2 for a sharded checkpoint (a newer number is refused with a clear error)
    task               "lm" or "classify": which network `model` holds
    model              the network's state_dict (without torch.compile's _orig_mod.)
    model_config       the GPTConfig, as a dict
    tokenizer          the tokenizer spec (gpt.tokenizer.from_spec rebuilds it)
    config             the run's resolved configuration, as {section: {key: value}}
    optimizer, scaler  state_dicts (scaler: empty unless fp16; optimizer: no "state" before the
                       first step)
    sampler            the training data sampler's state (a few integers)
    rng                every process's random generator states (python, numpy, torch, CUDA)
    iter, best, best_metric, evals_since_best, wandb_id
                       the loop's state (gpt.trainer.TrainState)
    metrics            the evaluation made at this iteration, or None (saved on a signal)
    objective          what the language model (or a classifier's backbone) was trained to predict:
                       "causal", "mlm" or "prefix" (gpt/objectives.py; absent: causal)
    labels, TASK, combine   fine-tuning tasks (classify, entailment, similarity, multiple_choice):
                       the head's outputs in order (["score"] for target = "score"), the task's
                       settings section, and how an example's sequences are combined (GPTClassifier)
    shards             instead of model and optimizer, under FSDP: the name of the directory
                       beside the file that holds them, written by every process (below)
    shards_hold_optimizer   False when the shards were written before the first step and hold
                       no optimizer state (absent: True)
    micro_batches_per_step   batch.batch_size micro-batches per optimiser step, over all
                       processes: a run resumed on another number of processes keeps it

In out_dir: ckpt-0001000.pt for each save (the last `keep_last` are kept),
ckpt.pt the latest and best.pt the best by the task's metric (both hard links,
so no data is written twice). A file appears complete or not at all.

Sharded checkpoints (a run with system.parallel = "fsdp"): each process writes
its pieces of the weights and optimizer state with torch.distributed.checkpoint
into ckpt-0001000.shards/ (no process ever holds the whole model); the directory
is written under a temporary name and renamed once every process has finished,
and only then is ckpt-0001000.pt written, so a kill at any moment leaves the
previous checkpoint whole. A directory that a checkpoint file names is never
replaced: a second save of the same iteration (a resumed run that evaluates where
the last one stopped) writes ckpt-0001000.2.shards, and a directory goes only
once no checkpoint file names it. Readers check a shard directory against its
index before reading (files present, sizes as recorded). They load on any number
of processes (the pieces are re-cut), in one process (load_model reads the
weights from the shards), and `python -m gpt.checkpoint consolidate out/run/ckpt.pt`
turns one into a single file.
"""

from __future__ import annotations

import os
import random
import shutil
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn

from gpt.atomic import atomic_path, check_writable
from gpt.errors import ArgumentParser, UserError, describe_os_error, exit_on_user_error, free_space
from gpt.model import GPT, GPTClassifier, GPTConfig
from gpt.hf import TOKENIZER_FILE, load_pretrained
from gpt.system import barrier
from gpt.tokenizer import Tokenizer, from_spec, get_tokenizer

FORMAT_VERSION = 2  # the newest this code writes and reads: 2 = sharded (FSDP), 1 = whole tensors
LATEST, BEST = "ckpt.pt", "best.pt"


# ---- random generators --------------------------------------------------------------------------


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


# ---- writing ------------------------------------------------------------------------------------


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
    try:
        with atomic_path(path) as tmp:
            torch.save({"format_version": 2 if "shards" in state else 1, **state}, tmp)
    except (OSError, RuntimeError) as e:  # torch's zip writer reports a full disk as a RuntimeError
        if isinstance(e, RuntimeError) and "writ" not in str(e).lower():
            raise  # not a failed write: a bug
        reason = describe_os_error(e) if isinstance(e, OSError) else "the write failed"
        free = free_space(str(out_dir))
        kept = (f"the previous {LATEST} is intact: free some space and continue with --resume"
                if (out_dir / LATEST).exists() else "free some space and run again")
        raise UserError(f"cannot write a checkpoint in {out_dir} ({reason}; {free or 'unknown'} free there): {kept}") from None
    _link(path, out_dir / LATEST)
    if is_best:
        _link(path, out_dir / BEST)
    for old in sorted(out_dir.glob("ckpt-*.pt"))[:-keep_last]:
        old.unlink()
    shard_dirs = list(out_dir.glob("ckpt-*.shards"))
    if shard_dirs:  # those no checkpoint file names go: rotated, replaced by a re-save, or orphaned by a kill
        try:
            needed = {_shards_named_by(p) for p in [*out_dir.glob("ckpt*.pt"), out_dir / BEST] if p.is_file()}
        except Exception as e:  # a file we cannot read may name any of them: remove none
            print(f"note: a checkpoint file in {out_dir} cannot be read ({type(e).__name__}): old shard "
                  f"directories are kept until it is removed")
            needed = {d.name for d in shard_dirs}
        for old in shard_dirs:
            if old.name not in needed:
                shutil.rmtree(old)
    return path


def _shards_named_by(path: Path) -> str | None:
    """The shard directory a checkpoint file names (None for whole tensors), without reading
    its tensors (memory-mapped)."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("shards")


def write_shards(state: dict, out_dir: str | Path, iteration: int) -> str:
    """Every process writes its pieces of `state` (FSDP's sharded state dicts) into
    ckpt-ITER.shards/ in out_dir, complete or not at all; returns the directory's name, which
    the checkpoint file written after it records. All processes must call this."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    out_dir = Path(out_dir)
    main = not dist.is_initialized() or dist.get_rank() == 0
    name = [_new_shard_name(out_dir, iteration) if main else None]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(name, src=0)  # every process writes under the name rank 0 chose
    final, tmp = out_dir / name[0], out_dir / f".{name[0]}.tmp-all"
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    dcp.save(state, checkpoint_id=tmp)  # each process its own file, fsynced; rank 0 adds the index
    barrier()
    if main:
        os.replace(tmp, final)
    barrier()
    return name[0]


def _new_shard_name(out_dir: Path, iteration: int) -> str:
    """ckpt-ITER.shards, or for a re-save of the same iteration (a resumed run that evaluates
    where the last one stopped) ckpt-ITER.2.shards, ...: a directory that a checkpoint file may
    still name is never replaced; save_checkpoint removes it once no file names it."""
    name, n = f"ckpt-{iteration:07d}.shards", 1
    while (out_dir / name).exists():
        n += 1
        name = f"ckpt-{iteration:07d}.{n}.shards"
    return name


def shard_dir(path: str | Path, ckpt: dict) -> Path:
    """The directory of a sharded checkpoint's weights (beside the file), checked before anything
    reads it: a damaged one is refused naming an intact checkpoint of the run to use instead."""
    path = Path(path)
    directory = path.parent / ckpt["shards"]
    problem = shard_problem(directory)
    if problem:
        other = _intact_checkpoint(path)
        hint = (f"use {other.name} instead (to resume from it, copy it to {LATEST})" if other else
                "no other checkpoint of the run is intact: copy the run directory whole again, or train again")
        raise UserError(f"{path} is damaged: its shard directory {directory.name} {problem}: {hint}")
    return directory


def shard_problem(directory: Path) -> str | None:
    """What is wrong with a shard directory, or None: its index (.metadata) must read, and every
    file the index lists must be there, at least as long as the pieces it records in it."""
    from torch.distributed.checkpoint import FileSystemReader

    if not (directory / ".metadata").is_file():
        return "is missing" if not directory.is_dir() else "has no index (.metadata)"
    try:
        needed: dict[str, int] = {}
        for piece in FileSystemReader(str(directory)).read_metadata().storage_data.values():
            needed[piece.relative_path] = max(needed.get(piece.relative_path, 0), piece.offset + piece.length)
    except Exception:  # truncated or not an index: unreadable
        return "has a damaged index (.metadata)"
    for name, size in sorted(needed.items()):
        file = directory / name
        if not file.is_file():
            return f"lacks {name}"
        if file.stat().st_size < size:
            return f"holds a truncated {name} ({file.stat().st_size:,} of {size:,} bytes)"
    return None


def _intact_checkpoint(damaged: Path) -> Path | None:
    """The newest other checkpoint file beside `damaged` whose weights are whole (None if none)."""
    for other in [*sorted(damaged.parent.glob("ckpt-*.pt"), reverse=True), damaged.parent / BEST]:
        if not other.is_file() or other.samefile(damaged):
            continue
        try:
            shards = _shards_named_by(other)
        except Exception:  # a damaged file: not a candidate
            continue
        if shards is None or shard_problem(damaged.parent / shards) is None:
            return other
    return None


def read_shards(state: dict, directory: str | Path) -> None:
    """Fill `state` (state dicts whose tensors are the right shape: whole, or this process's
    shards under FSDP) in place from a shard directory; works on any number of processes."""
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():  # one process without a process group is a use we intend
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=directory)


def load_weights(model: nn.Module, ckpt: dict, path: str | Path) -> None:
    """A checkpoint's weights into `model` (whole tensors): from the file, or from its shards."""
    if "shards" not in ckpt:
        model.load_state_dict(ckpt["model"])
        return
    state = model.state_dict()
    read_shards({"model": state}, shard_dir(path, ckpt))
    model.load_state_dict(state)


# ---- reading ------------------------------------------------------------------------------------


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint's dict, tensors on the CPU. Only tensors and plain values are unpickled."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a directory: name a checkpoint file in it, e.g. {path / LATEST}")
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}: train first, or point to a directory that has {LATEST}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a checkpoint, or holding objects we refuse to unpickle
        raise UserError(f"cannot load checkpoint {path} ({type(e).__name__}): the file is damaged or not ours") from None
    version = ckpt.get("format_version") if isinstance(ckpt, dict) else None
    if version not in (1, FORMAT_VERSION):
        if isinstance(version, int) and version > FORMAT_VERSION:
            raise UserError(f"{path} has checkpoint format {version}, newer than this code's {FORMAT_VERSION}: "
                            f"upgrade gpt to read it")
        raise UserError(f"{path} is not a checkpoint of ours (format version {version!r}, expected "
                        f"{FORMAT_VERSION}): point to a file written by train.py")
    return ckpt


def previous_checkpoints(out_dir: str | Path) -> list[Path]:
    """The checkpoint files of a run directory: ckpt.pt, ckpt-*.pt, best.pt (and shard directories)."""
    out_dir = Path(out_dir)
    files = [p for p in [*out_dir.glob("ckpt*.pt"), out_dir / BEST] if p.is_file()]
    return sorted(files + [p for p in out_dir.glob("ckpt-*.shards") if p.is_dir()])


def find_checkpoint(out_dir: str | Path, note=print) -> Path:
    """The checkpoint to resume a run from: ckpt.pt, else the newest ckpt-ITER.pt (with a note)."""
    out_dir = Path(out_dir)
    if (out_dir / LATEST).is_file():
        return out_dir / LATEST
    numbered = sorted(out_dir.glob("ckpt-*.pt"))
    if numbered:
        note(f"note: {out_dir} has no {LATEST}: resuming from {numbered[-1].name}, its newest checkpoint")
        return numbered[-1]
    there = f"only {BEST}" if (out_dir / BEST).is_file() else "no checkpoint"
    hint = (f"copy {BEST} to {LATEST} to resume from the best evaluation, or start a new run with --overwrite"
            if (out_dir / BEST).is_file() else "start a new run (without --resume)")
    raise UserError(f"nothing to resume: {out_dir} has no {LATEST} ({there}): {hint}")


def checkpoint_path(out_dir: str | Path, ckpt: str) -> Path:
    """A command line's --ckpt: a file name inside --out_dir, unless written as a path (a/b.pt)."""
    return Path(ckpt) if Path(ckpt).parent != Path(".") else Path(out_dir) / ckpt


FINE_TUNED = ("classify", "entailment", "similarity", "multiple_choice")  # a GPTClassifier; python -m gpt.classify
NOUNS = {"lm": "language model", "classify": "classifier", FINE_TUNED: "fine-tuned classifier"}  # what checkpoints hold
READERS = {"lm": "generate text from it with python sample.py --ckpt={path}",
           **{task: "predict with it: python -m gpt.classify --out_dir={dir}" for task in FINE_TUNED}}


def check_task(ckpt: dict, path: str | Path, task: str | tuple[str, ...], hint: str = "") -> None:
    """Refuse a checkpoint of another task (or of none of a tuple's), with `hint` or else the
    command that reads it."""
    found = ckpt.get("task", "lm")
    if found not in ((task,) if isinstance(task, str) else task):
        reader = READERS.get(found, "use the command of that task")
        if ckpt.get("objective") == "mlm":  # a masked LM generates nothing
            reader = "measure it with python -m gpt.evaluate --ckpt={path}, or fine-tune from it (run.init_from)"
        hint = hint or reader.format(path=path, dir=Path(path).parent)
        raise UserError(f"{path} is a {found} checkpoint, not a {NOUNS.get(task, f'{task} model')}: {hint}")


def gpt_from_checkpoint(ckpt: dict, dropout: float | None = None) -> GPT:
    """A GPT of a checkpoint's architecture (for a classifier: its backbone), weights not
    loaded; dropout, if given, replaces the checkpoint's."""
    config = GPTConfig(**ckpt["model_config"])
    if dropout is not None:
        config.dropout = dropout
    return GPT(config)


def network_from_checkpoint(ckpt: dict) -> nn.Module:
    """The network a checkpoint's weights belong to (weights not loaded): a GPT, or for a
    fine-tuning task a GPTClassifier around one (its head as the checkpoint records)."""
    backbone = gpt_from_checkpoint(ckpt)
    if ckpt.get("task", "lm") in FINE_TUNED:
        combine = ckpt.get("combine", "sum")
        return GPTClassifier(backbone, 1 if combine == "choice" else len(ckpt["labels"]), combine=combine,
                             bidirectional=ckpt.get("objective", "causal") != "causal")
    return backbone


def hf_language_model(name_or_dir: str | Path, **overrides) -> tuple[GPT, Tokenizer]:
    """A Hugging Face GPT-2 (gpt.hf.load_pretrained; overrides: dropout, ...) and its tokenizer: the
    one gpt.hf.save_pretrained recorded beside the weights, else GPT-2's. A model whose vocabulary
    is not that tokenizer's is refused (its ids would be read as other tokens)."""
    model, spec = load_pretrained(name_or_dir, **overrides)
    tokenizer = get_tokenizer("gpt2") if spec is None else from_spec(spec)
    if tokenizer.vocab_size != model.config.vocab_size:
        which = (f"GPT-2's tokenizer (no {TOKENIZER_FILE} names another)" if spec is None
                 else f"the tokenizer in its {TOKENIZER_FILE}")
        raise UserError(f"{name_or_dir} holds a model of {model.config.vocab_size:,} token ids, but {which} has "
                        f"{tokenizer.vocab_size:,}: read a model of ours from its run directory (--out_dir), or "
                        f"export it with gpt.hf.save_pretrained(model, dir, tokenizer)")
    return model, tokenizer


def add_model_options(parser, ckpt_default: str, out_dir_default: str | None = None) -> None:
    """The command-line options that name a language model: ours (--out_dir, --ckpt) or a
    Hugging Face GPT-2 (--init_from). Read them back with load_language_model.

    --out_dir and --ckpt stay None unless given (their defaults are kept in args.model_defaults
    and applied by load_language_model), so that one given beside --init_from is refused."""
    parser.add_argument("--out_dir", help="a language-model run's directory"
                        + (f" (default: {out_dir_default})" if out_dir_default else ""))
    parser.add_argument("--ckpt", help=f"checkpoint in out_dir, or a path (default: {ckpt_default})")
    parser.add_argument("--init_from", help="a Hugging Face GPT-2 instead of --out_dir: gpt2, gpt2-medium, ... or a "
                        "directory (a hub id needs the network; one exported by gpt.hf.save_pretrained with its "
                        "tokenizer is read with that tokenizer)")
    parser.set_defaults(model_defaults={"out_dir": out_dir_default, "ckpt": ckpt_default})


class LanguageModel(NamedTuple):
    model: GPT  # in eval mode
    tokenizer: Tokenizer
    data_dir: str | None  # the data directory of its run (None for a Hugging Face model)
    objective: str  # what it was trained to predict (gpt/objectives.py)


def load_language_model(args, device=None, objectives: tuple[str, ...] = ("causal", "prefix"),
                        why: str = "it cannot generate left to right") -> LanguageModel:
    """The model named by add_model_options' arguments. A Hugging Face directory's tokenizer
    is the one gpt.hf.save_pretrained recorded there, else GPT-2's; a model whose vocabulary is not
    that tokenizer's is refused (its ids would be read as other tokens). A model trained with an
    objective not in `objectives` is refused (`why`: what the command needs that it lacks)."""
    if args.init_from:
        given = [f"--{name}" for name in ("out_dir", "ckpt") if getattr(args, name) is not None]
        if given:
            raise UserError(f"--init_from and {' and '.join(given)} both name the model: give --init_from for a "
                            f"Hugging Face model, or {' and '.join(given)} for a run of ours, not both")
        model, tokenizer = hf_language_model(args.init_from)
        return LanguageModel(model.to(device).eval(), tokenizer, None, "causal")
    out_dir = args.model_defaults["out_dir"] if args.out_dir is None else args.out_dir
    if not out_dir:
        raise UserError("name the model: --out_dir=DIR (a run of ours) or --init_from=gpt2 (a Hugging Face GPT-2)")
    ckpt_name = args.model_defaults["ckpt"] if args.ckpt is None else args.ckpt
    path = checkpoint_path(out_dir, ckpt_name)
    model, tokenizer, ckpt = load_model(path, task="lm", device=device)
    objective = ckpt.get("objective", "causal")
    if objective not in objectives:
        raise UserError(f"{path} is a masked language model (lm.objective = {objective!r}, BERT's): {why}; "
                        f"measure its masked-token loss with python -m gpt.evaluate (without --choices or --cloze), "
                        f"or fine-tune it on a task")
    return LanguageModel(model, tokenizer, ckpt["config"]["data"]["dir"], objective)


def load_model(path: str | Path, task: str | tuple[str, ...] = "lm", device=None) -> tuple[nn.Module, Tokenizer, dict]:
    """(model in eval mode, its tokenizer, the checkpoint dict) from a checkpoint file of `task`."""
    ckpt = load_checkpoint(path)
    check_task(ckpt, path, task)
    model = network_from_checkpoint(ckpt)
    load_weights(model, ckpt, path)
    return model.to(device).eval(), from_spec(ckpt["tokenizer"]), ckpt


# ---- python -m gpt.checkpoint consolidate ----------------------------------------------------------


def consolidate(path: str | Path, out: str | Path | None = None) -> Path:
    """A sharded checkpoint as one file (weights and optimizer state whole): readable by every
    command, and resumable like any checkpoint."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    path = Path(path)
    ckpt = load_checkpoint(path)
    if "shards" not in ckpt:
        raise UserError(f"{path} holds whole tensors already: every command reads it as it is")
    out = Path(out) if out else path.parent / f"consolidated-{ckpt['iter']:07d}.pt"
    check_writable(out, "--out")  # before the conversion, not after it
    with atomic_path(out) as tmp:
        dcp_to_torch_save(shard_dir(path, ckpt), tmp)
        whole = torch.load(tmp, map_location="cpu", weights_only=True)
        rest = {k: v for k, v in ckpt.items() if k not in ("shards", "shards_hold_optimizer")} | {"format_version": 1}
        optimizer = whole.get("optimizer", {"state": {}, "param_groups": []})  # none: saved before the first step
        torch.save({**rest, "model": whole["model"], "optimizer": optimizer}, tmp)
    return out


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(prog="python -m gpt.checkpoint", description="Checkpoint tools.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("consolidate", help="a sharded (FSDP) checkpoint as one file")
    c.add_argument("checkpoint", help="the checkpoint file, e.g. out/run/ckpt.pt")
    c.add_argument("--out", help="the file to write (default: consolidated-ITER.pt beside it)")
    args = p.parse_args(argv)
    print(f"wrote {consolidate(args.checkpoint, args.out)}")


if __name__ == "__main__":
    main()
