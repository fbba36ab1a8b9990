"""Every training setting, typed: read from a TOML file plus --key=value overrides.

    cfg = load_config("configs/shakespeare_char.toml", ["--optim.lr=1e-3", "--max_iters=100"])
    cfg.optim.lr, cfg.run.out_dir, cfg.model.n_layer     # cfg.model is a gpt.GPTConfig
    cfg.classify.train_file                              # a task's own section
    cfg.is_set("model.block_size")                       # set by the file or the command line?
    save_config(cfg, "out/shakespeare_char/config.toml")

A config file has one table per section: [run] [data] [model] [batch] [optim]
[eval] [log] [system], and one per task that has settings of its own, such as
[classify] (defined beside the task, in gpt/tasks/classify.py). Every key is
optional; the defaults are below and in the task files. An override is --section.key=value, or --key=value when no other section has that
key. Its value is read as TOML (1e-3, true, "text"), else taken as a string.

Errors name the key: an unknown key suggests the closest valid one, a value of
the wrong type or out of range says what was expected. Configs are data: TOML
is parsed, never executed.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path

from gpt.atomic import atomic_path
from gpt.checkpoint import find_checkpoint, load_checkpoint, previous_checkpoints
from gpt.errors import UserError, require
from gpt.model import GPTConfig
from gpt.tasks import TASKS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass
class RunConfig:
    task: str = "lm"  # lm (language modelling: see [lm]) | classify | entailment | similarity | multiple_choice
    out_dir: str = "out"  # checkpoints, config.toml, metrics.jsonl, loss.png
    init_from: str = "scratch"  # scratch | resume | gpt2 | gpt2-medium | gpt2-large | gpt2-xl | a HF directory
    max_iters: int = 5000  # optimiser steps
    seed: int = 1337
    keep_last: int = 2  # checkpoints kept besides the best one

    def __post_init__(self):
        require(self.task in TASKS, "task", f"one of {', '.join(TASKS)} (gpt/tasks)", self.task)
        require(self.max_iters >= 0, "max_iters", "a non-negative integer", self.max_iters)
        require(self.keep_last >= 1, "keep_last", "at least 1", self.keep_last)
        require(bool(self.out_dir), "out_dir", "a directory", self.out_dir)


@dataclass
class DataConfig:
    # A directory written by `python -m gpt.prepare`. A directory named after a tokenizer
    # (char, gpt2, byte) beside a texts/ folder, like data/shakespeare/char, is prepared
    # from those texts on first use.
    dir: str = "data/shakespeare/char"
    val_fraction: float = 0.1  # for that first-use preparation

    def __post_init__(self):
        require(0 <= self.val_fraction < 1, "val_fraction", "in [0, 1)", self.val_fraction)


@dataclass
class BatchConfig:
    batch_size: int = 12  # sequences per micro-batch, in each process
    grad_accum: int = 1  # micro-batches per optimiser step in each process (if tokens_per_step = 0)
    # Global batch in tokens per optimiser step, over all processes; if set, grad_accum is
    # derived from it: tokens_per_step / (batch_size * block_size * world_size).
    tokens_per_step: int = 0

    def __post_init__(self):
        require(self.batch_size >= 1, "batch_size", "a positive integer", self.batch_size)
        require(self.grad_accum >= 1, "grad_accum", "a positive integer", self.grad_accum)
        require(self.tokens_per_step >= 0, "tokens_per_step", "0 or a positive integer", self.tokens_per_step)


SCHEDULES = ("cosine", "constant", "wsd")
OPTIMIZERS = ("adamw", "muon")


@dataclass
class OptimConfig:
    # adamw: AdamW on every parameter | muon: Muon on the blocks' weight matrices at muon_lr, AdamW
    # on the rest (embeddings, head, norms, biases) at lr; gpt/optim.py
    name: str = "adamw"
    lr: float = 6e-4  # peak learning rate (AdamW's)
    min_lr: float = 6e-5  # where the decay ends
    schedule: str = "cosine"  # cosine | constant | wsd (warmup-stable-decay)
    warmup_iters: int = 100  # linear warmup from 0
    # cosine: iterations until min_lr is reached (0: max_iters); wsd: length of the final
    # linear decay to min_lr (0: the last 20% of max_iters). Unused by constant.
    decay_iters: int = 0
    weight_decay: float = 0.1  # on weight matrices and embeddings only
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0 = off
    muon_lr: float = 0.02  # muon: peak learning rate of the block matrices (follows the schedule as lr does)
    muon_momentum: float = 0.95  # muon: momentum (Nesterov)

    def __post_init__(self):
        require(self.name in OPTIMIZERS, "name", f"one of {', '.join(OPTIMIZERS)}", self.name)
        require(self.lr > 0, "lr", "positive", self.lr)
        require(0 <= self.min_lr <= self.lr, "min_lr", f"in [0, lr = {self.lr}]", self.min_lr)
        require(self.schedule in SCHEDULES, "schedule", f"one of {', '.join(SCHEDULES)}", self.schedule)
        require(self.warmup_iters >= 0, "warmup_iters", "a non-negative integer", self.warmup_iters)
        require(self.decay_iters >= 0, "decay_iters", "a non-negative integer", self.decay_iters)
        require(self.weight_decay >= 0, "weight_decay", "non-negative", self.weight_decay)
        require(0 <= self.beta1 < 1, "beta1", "in [0, 1)", self.beta1)
        require(0 <= self.beta2 < 1, "beta2", "in [0, 1)", self.beta2)
        require(self.grad_clip >= 0, "grad_clip", "non-negative (0 = off)", self.grad_clip)
        require(self.muon_lr > 0, "muon_lr", "positive", self.muon_lr)
        require(0 <= self.muon_momentum < 1, "muon_momentum", "in [0, 1)", self.muon_momentum)


@dataclass
class EvalConfig:
    eval_interval: int = 250  # evaluate (and checkpoint) every this many iterations
    eval_iters: int = 20  # batches per split for each evaluation (language modelling)
    early_stopping: int = 0  # stop after this many evaluations without a better best (0 = off)

    def __post_init__(self):
        require(self.eval_interval >= 1, "eval_interval", "a positive integer", self.eval_interval)
        require(self.eval_iters >= 1, "eval_iters", "a positive integer", self.eval_iters)
        require(self.early_stopping >= 0, "early_stopping", "a non-negative integer", self.early_stopping)


@dataclass
class LogConfig:
    log_interval: int = 10  # a console line and a metrics.jsonl record every this many iterations
    wandb: bool = False  # log to Weights & Biases (pip install "gpt[wandb]"; WANDB_MODE=offline works)
    wandb_project: str = "gpt"
    wandb_run_name: str = ""  # default: the name of out_dir
    plot: bool = True  # write out_dir/loss.png at the end (needs matplotlib)

    def __post_init__(self):
        require(self.log_interval >= 1, "log_interval", "a positive integer", self.log_interval)


DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class SystemConfig:
    device: str = "auto"  # auto (cuda, then mps, then cpu) | cpu | cuda | cuda:1 | mps
    dtype: str = "auto"  # auto (bf16 autocast on GPUs that have it, else fp16; fp32 on CPU) | float32 | bfloat16 | float16
    compile: bool | str = "auto"  # torch.compile the model: true | false | "auto" (on CUDA)
    # Under torchrun: "ddp" (a whole model per process) | "fsdp" (sharded over processes; gpt/parallel.py)
    parallel: str = "ddp"
    reshard_after_forward: bool = True  # fsdp: free gathered weights after forward (less memory, more traffic)
    activation_checkpointing: str = "none"  # "none" | "blocks" (recompute each block in backward: less memory)

    def __post_init__(self):
        require(self.dtype in DTYPES, "dtype", f"one of {', '.join(DTYPES)}", self.dtype)
        require(self.compile in (True, False, "auto"), "compile", 'true, false or "auto"', self.compile)
        require(self.parallel in ("ddp", "fsdp"), "parallel", '"ddp" or "fsdp"', self.parallel)
        require(self.activation_checkpointing in ("none", "blocks"), "activation_checkpointing", '"none" or "blocks"',
                self.activation_checkpointing)
        require(isinstance(self.reshard_after_forward, bool), "reshard_after_forward", "true or false",
                self.reshard_after_forward)


# Each task's own section ([classify], ...), from the task registry (gpt/tasks/__init__.py).
TASK_SECTIONS = {name: task.Settings for name, task in TASKS.items() if task.Settings is not None}


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: GPTConfig = field(default_factory=GPTConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    system: SystemConfig = field(default_factory=SystemConfig)
    # the task sections, by name; read them as attributes: cfg.classify
    tasks: dict = field(default_factory=lambda: {name: cls() for name, cls in TASK_SECTIONS.items()})
    # dotted keys that the file or the command line set (the rest are defaults): use is_set()
    explicit: frozenset = field(default_factory=frozenset, compare=False, repr=False)

    def __getattr__(self, name: str):
        tasks = self.__dict__.get("tasks", {})
        if name in tasks:
            return tasks[name]
        raise AttributeError(f"Config has no section {name!r}")

    def is_set(self, key: str) -> bool:
        """Whether the config file or the command line set this dotted key (else it is a default)."""
        return key in self.explicit

    def set_keys(self, section: str) -> set[str]:
        """The keys of one section that were set explicitly (without the section name)."""
        return {k.split(".", 1)[1] for k in self.explicit if k.split(".", 1)[0] == section}

    def to_dict(self) -> dict:
        return {s: dataclasses.asdict(getattr(self, s)) for s in SECTIONS}


SECTIONS = {**{f.name: f.default_factory for f in dataclasses.fields(Config) if f.name not in ("tasks", "explicit")},
            **TASK_SECTIONS}


def _fields(section: str) -> dict[str, type]:
    cls = SECTIONS[section]
    return {f.name: typing.get_type_hints(cls)[f.name] for f in dataclasses.fields(cls)}


ALL_KEYS = {f"{s}.{k}": t for s in SECTIONS for k, t in _fields(s).items()}


def resolve_key(key: str) -> str:
    """'optim.lr' as is; 'lr' to 'optim.lr' when only one section has it; else a clear error."""
    if key in ALL_KEYS:
        return key
    if "." not in key:
        owners = [k for k in ALL_KEYS if k.split(".", 1)[1] == key]
        if len(owners) == 1:
            return owners[0]
        if owners:
            raise UserError(f"config key {key!r} is ambiguous: write one of {', '.join(owners)}")
    short = {k.split(".", 1)[1]: k for k in ALL_KEYS}
    close = difflib.get_close_matches(key, [*ALL_KEYS, *short], n=1, cutoff=0.6)
    hint = f": did you mean {short.get(close[0], close[0])!r}?" if close else f": valid sections are {', '.join(SECTIONS)}"
    raise UserError(f"unknown config key {key!r}{hint}")


def _typed(key: str, value, typ):
    """value, checked against the field's type (int for float is fine); else a clear error."""
    allowed = typing.get_args(typ) or (typ,)
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    ok = isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed)
    if not ok:
        names = " or ".join({bool: "a boolean", int: "an integer", float: "a number", str: "a string"}[t] for t in allowed)
        raise UserError(f"{key} must be {names}, got {value!r} ({type(value).__name__})")
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{key} must be a finite number, got {value!r}")
    return value


def _parse_override(arg: str) -> tuple[str, object]:
    if not arg.startswith("--") or "=" not in arg:
        raise UserError(f"cannot read argument {arg!r}: write overrides as --key=value (e.g. --optim.lr=1e-3)")
    key, raw = arg[2:].split("=", 1)
    key = resolve_key(key)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    allowed = typing.get_args(ALL_KEYS[key]) or (ALL_KEYS[key],)
    if str in allowed and not isinstance(value, allowed):
        value = raw  # e.g. --run.out_dir=2024 is the directory "2024"
    return key, value


def _flatten(table: dict, source: str) -> dict[str, object]:
    """A parsed TOML document -> {dotted key: value}; top-level keys resolve like overrides."""
    flat = {}
    for name, value in table.items():
        if isinstance(value, dict):
            if name not in SECTIONS:
                close = difflib.get_close_matches(name, SECTIONS, n=1)
                hint = f": did you mean [{close[0]}]?" if close else f": valid sections are {', '.join(SECTIONS)}"
                raise UserError(f"{source}: unknown section [{name}]{hint}")
            for key, v in value.items():
                if isinstance(v, dict):
                    raise UserError(f"{source}: [{name}.{key}] is a table; sections hold plain values")
                flat[resolve_key(f"{name}.{key}")] = v
        else:
            flat[resolve_key(name)] = value
    return flat


def config_from_dict(values: dict[str, object]) -> Config:
    """A Config from {dotted key: value}; checks every type and range."""
    by_section: dict[str, dict] = {s: {} for s in SECTIONS}
    for key, value in values.items():
        section, name = key.split(".", 1)
        by_section[section][name] = _typed(key, value, ALL_KEYS[key])
    sections = {}
    for section, kwargs in by_section.items():
        try:
            sections[section] = SECTIONS[section](**kwargs)
        except UserError as e:
            raise UserError(f"{section}.{e}") from None
    tasks = {name: sections.pop(name) for name in TASK_SECTIONS}
    return Config(**sections, tasks=tasks, explicit=frozenset(values))


def _file_values(path: str | Path) -> dict[str, object]:
    """{dotted key: value} of a TOML config file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist: see configs/ for examples") from None
    except UnicodeDecodeError as e:
        raise UserError(f"config file {path} is not UTF-8 text (byte {e.start}): save it as UTF-8") from None
    except OSError as e:
        raise UserError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        return _flatten(tomllib.loads(text), str(path))
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path} is not valid TOML: {e}") from None


def _override_values(overrides: list[str]) -> dict[str, object]:
    """{dotted key: value} of --key=value arguments; a key given twice is refused."""
    values: dict[str, object] = {}
    for arg in overrides:
        key, value = _parse_override(arg)
        if key in values:
            raise UserError(f"--{key} is given twice ({values[key]!r} and {value!r}): give it once")
        values[key] = value
    return values


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """The config of a TOML file (None: all defaults) with --key=value overrides applied."""
    values = _file_values(path) if path is not None else {}
    return config_from_dict({**values, **_override_values(overrides)})


# Settings a resumed run may change: they decide how long it runs, how it is watched and where
# it runs, not what it learns. Everything else would make the resumed run a different run.
CHANGEABLE_ON_RESUME = ("run.max_iters", "run.keep_last", "eval.eval_interval", "eval.eval_iters",
                        "eval.early_stopping", "log.", "system.")


def resume_config(path: str | Path | None, overrides: list[str] = ()) -> tuple[Config, list[str]]:
    """The config of a resumed run, and notes to print.

    The run's own config.toml (in run.out_dir, which the file or the overrides name) is the
    base, so the run continues as it started; CONFIG.toml's other values are ignored (with
    a note). Overrides apply on top, but only those in CHANGEABLE_ON_RESUME: a change of
    learning rate, schedule, batch, model or data is refused.
    """
    given = load_config(path, overrides)  # checks the file and the overrides, names out_dir
    out_dir = Path(given.run.out_dir)
    saved_path, notes = out_dir / "config.toml", []
    if saved_path.is_file():
        saved = config_from_dict(_file_values(saved_path))
    elif previous_checkpoints(out_dir):  # config.toml lost: every checkpoint holds the run's config too
        ckpt_path = find_checkpoint(out_dir, note=notes.append)
        stored = load_checkpoint(ckpt_path)["config"]
        saved = config_from_dict({f"{s}.{k}": v for s, section in stored.items() for k, v in section.items()})
        notes.append(f"note: {saved_path} is missing: resuming with the configuration stored in {ckpt_path.name}")
    else:
        raise UserError(f"nothing to resume: {out_dir} has no ckpt.pt (no checkpoint at all): start a run there "
                        f"first, or name the run's directory with --run.out_dir")
    if given.run.task != saved.run.task and given.is_set("run.task"):
        raise UserError(f"{out_dir} holds a {saved.run.task} run, but run.task = {given.run.task!r} here: resume it "
                        f"with its own config (python train.py --resume --run.out_dir={out_dir}) or choose another run.out_dir")
    over = _override_values(overrides)
    resumed = config_from_dict({**flat_dict(saved), **over, "run.out_dir": str(out_dir), "run.init_from": "resume"})
    before, after = flat_dict(saved), flat_dict(resumed)
    changed = [k for k in over if before[k] != after[k] and k not in ("run.out_dir", "run.init_from")]
    refused = [k for k in changed if not k.startswith(CHANGEABLE_ON_RESUME)]
    if refused:
        k = refused[0]
        raise UserError(f"--{k}={after[k]!r} would change the resumed run (it has {before[k]!r}): a resumed run "
                        f"continues exactly; change it in a new run (another run.out_dir, or --overwrite)")
    for k in changed:
        notes.append(f"note: resuming with {k} = {after[k]!r} (was {before[k]!r})")
        if k == "run.max_iters" and saved.optim.schedule != "constant" and not saved.optim.decay_iters:
            notes[-1] += ": the learning-rate decay now ends there"
    if path is not None:
        from_file = flat_dict(given)
        ignored = sorted(k for k in given.explicit
                         if k not in over and k not in ("run.out_dir", "run.init_from") and before[k] != from_file[k])
        if ignored:
            notes.append(f"note: resuming with the run's own configuration; {path} differs in "
                         f"{', '.join(ignored[:5])}{' ...' if len(ignored) > 5 else ''} (ignored)")
    return resumed, notes


def flat_dict(cfg: Config) -> dict[str, object]:
    return {f"{s}.{k}": v for s, section in cfg.to_dict().items() for k, v in section.items()}


def to_toml(cfg: Config) -> str:
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v, ensure_ascii=False)  # JSON string escapes are valid TOML
        return repr(v)

    lines = ["# The resolved configuration of this run: python train.py THIS_FILE reproduces it."]
    for section, values in cfg.to_dict().items():
        lines += ["", f"[{section}]"] + [f"{k} = {value(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def save_config(cfg: Config, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(to_toml(cfg))
