"""Measure a language model on text: loss, perplexity, bits per byte, by context length and position;
or on downstream tasks without fine-tuning: multiple choice and cloze, zero- or few-shot.

    python -m gpt.evaluate --out_dir=out/shakespeare_char                      # the run's validation split
    python -m gpt.evaluate --out_dir=out/shakespeare_char --context=32,64,128 --plot
    python -m gpt.evaluate --out_dir=out/x --data=data/other --split=train     # any prepared directory
    python -m gpt.evaluate --init_from=gpt2 --text essay.txt notes.txt --stride=512   # raw text files
    python -m gpt.evaluate --out_dir=out/shakespeare_char --choices=data/shakespeare/tasks/next_line_test.jsonl
    python -m gpt.evaluate --init_from=gpt2 --choices=hellaswag --cloze=lambada  # (downloaded once)

Multiple choice, few-shot prompts and cloze are gpt/downstream.py's (its docstring
says exactly how they are scored); the rest of this text is about the loss.
A masked language model (lm.objective = "mlm") is scored by its masked-token loss.

Every scored token t is predicted from the tokens before it inside a window of
`context` tokens the model reads. Non-overlapping windows (stride = context, the
default) score every token but the first exactly once, each with 1 to context
tokens before it; a smaller --stride slides the window and scores each token
once, with more context (up to `context` tokens); stride = context + 1 is the
training layout (whole windows of context + 1 tokens; the first token of each
is not scored): on the same windows it gives the trainer's validation loss
(the trainer scores eval.eval_iters batches spread over the split).

Reported per evaluated set and context: mean loss (nats per token), perplexity,
and bits per byte: the total loss in bits over the UTF-8 bytes of the text the
scored tokens stand for (end-of-text ids stand for none). A character model and
a GPT-2-BPE model score different numbers of tokens on the same text, so only
bits per byte compares them. The loss at each position of the window shows how
much context helps. How long a context may be is the model's to say
(GPT.max_context()): learned position embeddings stop at block_size; the other
position schemes read any length, which is how --context=256,512,1024 on a model
trained at 128 measures length extrapolation.

Every setting is checked before anything is evaluated: the stride against every
context, the outputs, and the memory a batch of the longest windows will take
(gpt.model.forward_bytes: what the model allocates).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from gpt.atomic import atomic_path, check_outputs
from gpt.checkpoint import add_model_options, load_language_model
from gpt.dataset import TokenDataset
from gpt.downstream import dataset_file, evaluate_choices, evaluate_cloze, print_downstream, read_choices, read_cloze
from gpt.errors import ArgumentParser, UserError, exit_on_user_error
from gpt.model import GPT, forward_bytes
from gpt.objectives import MASK, OBJECTIVES, mask_tokens
from gpt.system import (Processes, all_reduce_sum, autocast, check_memory, exit_worker, finish_processes, pick_device,
                        pick_dtype, start_processes)
from gpt.tokenizer import Tokenizer, base_spec, from_spec


@dataclass
class Result:
    """The figures of one evaluated set at one context length."""

    name: str  # what was evaluated (a split, a file)
    context: int  # tokens the model reads per window
    stride: int  # tokens between window starts
    tokens: int  # tokens scored
    bytes: int  # UTF-8 bytes those tokens stand for
    nats: float  # their summed loss
    position_loss: list[float] = field(default_factory=list)  # mean loss at each window position (NaN: none)

    @property
    def loss(self) -> float:
        return self.nats / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    @property
    def bits_per_byte(self) -> float:
        return self.nats / math.log(2) / self.bytes if self.bytes else float("nan")

    def to_dict(self) -> dict:
        """For JSON: positions where nothing was scored are null."""
        figures = {**asdict(self), "loss": self.loss, "perplexity": self.perplexity, "bits_per_byte": self.bits_per_byte}
        figures["position_loss"] = [None if math.isnan(v) else v for v in self.position_loss]
        return figures


def check_windows(name: str, n_tokens: int, context: int, stride: int) -> None:
    """Refuse a stride that would skip tokens, and a stream of n_tokens too short for one window
    of the training layout (stride = context + 1: whole windows of context + 1 tokens only)."""
    if not 1 <= stride <= context + 1:
        raise UserError(f"--stride={stride} must be between 1 and context + 1 = {context + 1} for --context={context} "
                        f"(a larger one would skip tokens)")
    if stride > context and n_tokens < context + 1:
        raise UserError(f"{name} has {n_tokens} tokens: too few for one window of the training layout "
                        f"(context + 1 = {context + 1} tokens); use a smaller --stride or more text")


def windows(n_tokens: int, context: int, stride: int, name: str = "the token stream") -> list[tuple[int, int, int]]:
    """(start, length, first scored position) of each window over a stream of n_tokens.

    A window reads tokens[start : start + length] and predicts tokens[start + 1 : start + length + 1];
    positions before `first` were scored by an earlier window (sliding) and are skipped. With
    stride = context + 1 (the training layout) only whole windows count, as in training.
    A stride or stream that check_windows refuses raises its UserError (name: the stream's).
    """
    check_windows(name, n_tokens, context, stride)
    found, start, scored_to = [], 0, 0  # scored_to: the highest target index scored so far
    while scored_to < n_tokens - 1 and start < n_tokens - 1:
        length = min(context, n_tokens - 1 - start)
        if length < context and stride > context:
            break  # the training layout has no partial window
        first = max(0, scored_to - start)
        found.append((start, length, first))
        scored_to = start + length
        start += stride
    return found


@torch.no_grad()
def evaluate_tokens(model: GPT, tokens: np.ndarray, name: str, context: int, stride: int, *, byte_lengths: np.ndarray,
                    batch_size: int = 8, device=None, dtype=torch.float32, procs: Processes | None = None,
                    progress: bool | None = None, masked: Tokenizer | None = None) -> Result:
    """Score a token stream with windows of `context` tokens every `stride` tokens (see `windows`).
    Under torchrun each process scores every world_size-th batch; the sums are added exactly.

    masked: a masked LM's tokenizer (with its mask token): score the masked-token loss instead,
    BERT's corruption (gpt.objectives.mask_tokens) of each window's tokens, the same masks on
    every run (each window's are drawn from its start); only chosen tokens are scored."""
    procs = procs or Processes()
    device = torch.device(device or "cpu")
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # nats, tokens, bytes
    position = torch.zeros(2, context, dtype=torch.float64, device=device)  # loss sums, counts
    byte_lengths_t = torch.as_tensor(byte_lengths, device=device)
    found = windows(len(tokens), context, stride, name)
    batches = _batches(found, batch_size)
    mine = batches[procs.rank :: procs.world_size]
    model.eval()
    shown = procs.is_main and progress is not False
    disable = None if shown and progress is None else not shown  # None: a bar only on a terminal
    for batch in tqdm(mine, desc=f"{name} @ {context}", unit="batch", disable=disable, leave=False, file=sys.stderr):
        length = batch[0][1]
        rows = np.stack([tokens[start : start + length + 1] for start, _, _ in batch]).astype(np.int64)
        rows = torch.from_numpy(rows).to(device)
        x, y = rows[:, :-1], rows[:, 1:]
        scored = torch.arange(length, device=device)[None, :] >= torch.tensor([f for _, _, f in batch], device=device)[:, None]
        if masked is not None:  # the window's own tokens, corrupted, predicted in place
            x, y = (t.to(device) for t in mask_tokens(x.cpu(), None, [start for start, _, _ in batch], seed=0,
                                                      mask_id=masked.added_id(MASK), vocab_size=masked.text_vocab_size))
            scored, y = scored & (y >= 0), y.clamp(min=0)
        with autocast(device, dtype):
            logits = model.logits(model.hidden_states(x, prefix=None if masked is None else length))
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction="none")
        loss = loss.view(y.shape).double() * scored
        sums += torch.stack([loss.sum(), scored.sum().double(), (byte_lengths_t[y] * scored).sum().double()])
        position[0, :length] += loss.sum(0)
        position[1, :length] += scored.sum(0).double()
    all_reduce_sum(sums)
    all_reduce_sum(position)
    nats, n_tokens, n_bytes = sums.tolist()
    per_position = (position[0] / position[1]).tolist()  # NaN where no token was scored at that position
    return Result(name, context, stride, int(n_tokens), int(n_bytes), nats, per_position)


def _batches(found: list[tuple[int, int, int]], batch_size: int) -> list[list[tuple[int, int, int]]]:
    """Windows grouped into batches of equal length (the last window of a stream may be shorter)."""
    by_length: dict[int, list] = {}
    for w in found:
        by_length.setdefault(w[1], []).append(w)
    return [group[i : i + batch_size] for group in by_length.values() for i in range(0, len(group), batch_size)]


# ---- what to evaluate --------------------------------------------------------------------------------


def token_sets(args, tok: Tokenizer, run_data: str | None) -> list[tuple[str, np.ndarray]]:
    """(name, token stream) of each set to evaluate: --text files, --data, or the run's own split."""
    if args.text:
        sets = []
        for path in map(Path, args.text):
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                raise UserError(f"--text {path} is not UTF-8 text: save it as UTF-8") from None
            ids = np.asarray(tok.encode(text), dtype=np.int64)
            if len(ids) < 2:
                raise UserError(f"--text {path} is {'empty' if not text else 'too short'}: "
                                f"evaluation needs at least two tokens of text")
            sets.append((path.name, ids))
        return sets
    data = args.data or run_data
    if data is None:
        raise UserError("nothing to evaluate: give --data=DIR (a prepared directory) or --text FILE...")
    split_name = args.split or "val"
    split = TokenDataset(data, split_name)
    theirs = from_spec(split.meta["tokenizer"])
    if base_spec(theirs.spec()) != base_spec(tok.spec()):
        raise UserError(f"{data} holds {theirs.name} tokens ({theirs.vocab_size} ids), but the model reads {tok.name} "
                        f"tokens ({tok.vocab_size} ids): evaluate on data prepared with the model's tokenizer, or --text")
    if len(split) < 2:
        raise UserError(f"{split.path} holds {len(split)} token(s): nothing to evaluate")
    split.check(1, tok.text_vocab_size)  # token ids the model has no embedding for: a damaged file
    return [(f"{split_name} ({data})", split.tokens)]


def print_table(results: list[Result]) -> None:
    width = max(len(r.name) for r in results)
    print(f"{'set':<{width}}  {'context':>7}  {'stride':>6}  {'tokens':>11}  {'bytes':>11}  "
          f"{'loss':>7}  {'ppl':>8}  {'bits/byte':>9}")
    for r in results:
        print(f"{r.name:<{width}}  {r.context:>7}  {r.stride:>6}  {r.tokens:>11,}  {r.bytes:>11,}  "
              f"{r.loss:>7.4f}  {r.perplexity:>8.2f}  {r.bits_per_byte:>9.4f}")


# ---- memory -------------------------------------------------------------------------------------------


def check_plan(model: GPT, sets: list[tuple[str, np.ndarray]], contexts: list[int], stride: int | None, batch_size: int,
               device: torch.device, dtype: torch.dtype) -> None:
    """Refuse, before anything is evaluated, what evaluate_tokens would refuse for any set and
    context (check_windows), and a batch of windows that does not fit in memory: the forward pass
    (forward_bytes) and the loss over the vocabulary (the logits, a float32 copy of them, and their
    log-probabilities)."""
    config = model.config
    for name, tokens in sets:
        for c in contexts:
            s = c if stride is None else stride
            check_windows(name, len(tokens), c, s)
            T = min(c, len(tokens) - 1)  # windows never reach past the end of the stream
            batch = min(batch_size, -(-(len(tokens) - 1) // s))  # no more than the windows there are
            logits = batch * T * (dtype.itemsize * config.padded_vocab_size + 8 * config.vocab_size)
            check_memory(forward_bytes(config, batch, T, dtype) + logits, device,
                         f"evaluating {name} at --context={c} (batches of {batch} x {T:,} tokens)",
                         "use a smaller --context or --batch_size")


# ---- command line -------------------------------------------------------------------------------------


def _contexts(text: str | None, limit: int | None, default: int, why: str = "learned position embeddings") -> list[int]:
    try:
        contexts = [int(c) for c in text.split(",")] if text else [default]
    except ValueError:
        raise UserError(f"--context={text} must be comma-separated whole numbers, e.g. 128,256,512") from None
    for c in contexts:
        if c < 1:
            raise UserError(f"--context={c} must be at least 1 token")
        if limit is not None and c > limit:
            raise UserError(f"--context={c} is longer than this model can read: its {why} cover block_size = "
                            f"{limit} positions; use at most {limit} (models with position = sinusoidal, rope, alibi "
                            f"or none and no Synthesizer read any length)")
    return contexts


def write_json(path: str | None, results: list[dict]) -> None:
    if path:
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {path}")


def check_downstream_options(args) -> None:
    """Refuse options that would be ignored or cannot work, before the model is loaded."""
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be at least 1, got {args.limit}")
    if not args.choices:
        given = [f"--{o}" for o in ("shots", "shots_from") if getattr(args, o)] + ["--seed"] * (args.seed is not None)
        if given:
            raise UserError(f"{', '.join(given)}: for few-shot multiple choice; give --choices=FILE")
    if not (args.choices or args.cloze):
        if args.limit is not None:
            raise UserError("--limit counts the questions of --choices or the texts of --cloze: give one of them")
        return
    loss_options = [f"--{o}" for o in ("data", "split", "text", "context", "stride", "plot")
                    if getattr(args, o) is not None]
    if loss_options:
        raise UserError(f"--choices and --cloze measure downstream tasks, so {', '.join(loss_options)} (for the loss) "
                        f"would be ignored: run the two evaluations separately")
    if args.shots < 0:
        raise UserError(f"--shots must be 0 or more, got {args.shots}")
    if args.shots and not args.shots_from:
        raise UserError(f"--shots={args.shots} needs --shots_from=FILE: solved questions from another split")
    if args.shots_from and not args.shots:
        raise UserError("--shots_from is where --shots come from: give --shots=k too")
    if args.shots_from and args.choices and Path(args.shots_from).resolve() == Path(args.choices).resolve():
        raise UserError("--shots_from is the file being evaluated: draw the solved questions from another split")


def evaluate_downstream(args, model: GPT, tok: Tokenizer, device, dtype, procs: Processes) -> list[dict]:
    results = []
    common = dict(batch_size=args.batch_size, device=device, dtype=dtype, procs=procs)
    if args.choices:
        questions = read_choices(dataset_file(args.choices, "--choices", procs), "--choices")[: args.limit]
        pool = read_choices(args.shots_from, "--shots_from") if args.shots_from else []
        results.append(evaluate_choices(model, tok, questions, Path(args.choices).name, shots=args.shots,
                                        shot_pool=pool, seed=args.seed or 0, **common))
    if args.cloze:
        texts = read_cloze(dataset_file(args.cloze, "--cloze", procs), "--cloze")[: args.limit]
        results.append(evaluate_cloze(model, tok, texts, Path(args.cloze).name, **common))
    return results


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(prog="python -m gpt.evaluate", description=__doc__.split("\n\n")[0])
    add_model_options(p, ckpt_default="best.pt")
    p.add_argument("--data", help="a prepared data directory (default: the run's own)")
    p.add_argument("--split", choices=["train", "val"], help="which split of --data (default: val)")
    p.add_argument("--text", nargs="+", metavar="FILE", help="raw UTF-8 text files instead, each its own set")
    p.add_argument("--context", help="context lengths, comma-separated (default: the model's block_size)")
    p.add_argument("--stride", type=int, help="tokens between windows (default: = context, no overlap)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--choices", metavar="FILE", help="multiple choice in HellaSwag's JSONL layout (ctx, endings, "
                   "label), or 'hellaswag' (its validation set, downloaded once): acc, acc_norm, acc_char")
    p.add_argument("--shots", type=int, default=0, help="solved questions before each one (few-shot; default 0)")
    p.add_argument("--shots_from", metavar="FILE", help="where the --shots come from (another split of --choices)")
    p.add_argument("--cloze", metavar="FILE", help="last-word accuracy on JSONL texts (LAMBADA's layout), or "
                   "'lambada' (OpenAI's test set, downloaded once)")
    p.add_argument("--limit", type=int, help="--choices / --cloze: only the first N questions or texts")
    p.add_argument("--seed", type=int, help="draws the --shots (default 0)")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    p.add_argument("--plot", nargs="?", const="", metavar="PNG",
                   help="draw loss by context length and by position (default file: OUT_DIR/evaluation.png)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    args = p.parse_args(argv)
    if args.batch_size < 1:
        raise UserError(f"--batch_size must be at least 1, got {args.batch_size}")
    downstream = args.choices or args.cloze
    check_downstream_options(args)
    ignored = [option for option, value in (("--data", args.data), ("--split", args.split)) if value]
    if args.text and ignored:
        raise UserError(f"--text evaluates the files given, so {' and '.join(ignored)} would be ignored: give "
                        f"--text, or {' and '.join(ignored)}, not both")

    plot_path = None if args.plot is None else Path(args.plot or Path(args.out_dir or ".") / "evaluation.png")
    if not args.out_dir or Path(args.out_dir).is_dir():  # (a missing run: loading the model says so)
        check_outputs([(option, path) for option, path in (("--json", args.json), ("--plot", plot_path)) if path])

    device = pick_device(args.device)
    procs = start_processes(device)
    dtype = pick_dtype(args.dtype, device)
    model, tok, run_data, objective = load_language_model(args, device, ("causal", "prefix") if downstream else OBJECTIVES,
                                                          "downstream tasks are scored left to right")
    if objective == "mlm" and args.stride is not None:
        raise UserError("a masked language model is scored on whole, non-overlapping windows: remove --stride")
    if downstream:
        results = evaluate_downstream(args, model, tok, device, dtype, procs)
        finish_processes()
        if procs.is_main:
            print_downstream(results)
            write_json(args.json, results)
        return
    contexts = _contexts(args.context, model.max_context(), model.config.block_size, model.context_limit())
    sets = token_sets(args, tok, run_data)
    check_plan(model, sets, contexts, args.stride, args.batch_size, device, dtype)
    byte_lengths = tok.byte_lengths()
    results = [evaluate_tokens(model, tokens, name, c, c if args.stride is None else args.stride, byte_lengths=byte_lengths,
                               batch_size=args.batch_size, device=device, dtype=dtype, procs=procs,
                               masked=tok if objective == "mlm" else None)
               for name, tokens in sets for c in contexts]
    finish_processes()
    if not procs.is_main:
        return
    if objective == "mlm":
        print("a masked language model: the loss of the 15% of tokens BERT's corruption chose in each window, "
              "predicted in place")
    print_table(results)
    write_json(args.json, [r.to_dict() for r in results])
    if plot_path is not None:
        from gpt.plot import plot_evaluation

        plot_evaluation(results, plot_path)


if __name__ == "__main__":
    main()
    exit_worker()  # under torchrun: no interpreter shutdown to abort in (gpt/system.py)
