"""Text corpus -> token files that training memory-maps: DIR/train.bin, DIR/val.bin, DIR/meta.json.

    python -m gpt.prepare INPUT... --out=DIR --tokenizer=gpt2|char|byte
        [--val_fraction=0.01] [--workers=N] [--seed=0] [--text_field=text] [--overwrite]

INPUT is any mix of text files, .gz/.bz2/.xz-compressed text files, JSON Lines
files (.jsonl, optionally compressed) whose --text_field holds the text,
directories (read recursively, hidden files skipped) and glob patterns, plus
`hf:NAME` or `hf:NAME:SUBSET` for a Hugging Face dataset's train split, streamed
(needs `pip install "gpt[datasets]"` and the network).

A file is a document; a JSON line is a document. Every document ends with the
tokenizer's end-of-text id. Whole documents go to the validation split, chosen
from --seed (the first document always trains); if none is chosen (a corpus of
one document, say), the last val_fraction of the tokens is split off instead,
inside that document, and a note says so.

How it scales: the main process streams the inputs (reading, decompressing,
decoding UTF-8) and cuts them into ~1 MB work items; worker processes tokenize
them (tiktoken for gpt2) while the main process writes finished items in order.
At most 2 items per worker are in flight and long documents are cut into pieces
(at places where cutting does not change the tokens), so memory stays bounded
whatever the corpus size, and the output is the same for any number of workers.
Files are written under temporary names and renamed when complete, meta.json
last: an interrupted run leaves nothing that looks finished.

Bytes that are not valid UTF-8 are replaced by U+FFFD, counted and reported.
"""

from __future__ import annotations

import bz2
import codecs
import collections
import contextlib
import glob
import gzip
import hashlib
import io
import json
import lzma
import multiprocessing
import os
import random
import signal
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Iterator

import numpy as np

from gpt.atomic import atomic_path
from gpt.errors import ArgumentParser, UserError, describe_os_error, exit_on_user_error
from gpt.tokenizer import TOKENIZERS, Tokenizer, from_spec, get_tokenizer

FORMAT_VERSION = 1
DECOMPRESSORS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
PIECE_CHARS = 1 << 20  # longer documents are tokenized in pieces of about this many characters
ITEM_CHARS = 1 << 20  # text per work item sent to a worker
SPLITS = ("train", "val")


# ---- reading inputs -------------------------------------------------------------------


class Input:
    """One input file: where it is, and what reading it found (sha256, size, bad bytes)."""

    def __init__(self, path: Path):
        self.path = path
        self.size = path.stat().st_size
        self.sha256 = hashlib.sha256()
        self.bytes_read = 0
        self.replaced_bytes = 0

    @property
    def is_jsonl(self) -> bool:
        return ".jsonl" in self.path.suffixes

    def record(self) -> dict:
        return {"path": str(self.path), "bytes": self.size, "sha256": self.sha256.hexdigest(),
                "replaced_bytes": self.replaced_bytes}


class _HashingReader(io.RawIOBase):
    """Passes a file's bytes through, hashing and counting them on the way."""

    def __init__(self, f, source: Input):
        self.f, self.source = f, source

    def readable(self):
        return True

    def readinto(self, buffer):
        n = self.f.readinto(buffer)
        self.source.sha256.update(memoryview(buffer)[:n])
        self.source.bytes_read += n
        return n


_current_input: list[Input] = []  # the file being decoded, for the error handler below


def _count_and_replace(error: UnicodeDecodeError):
    _current_input[-1].replaced_bytes += error.end - error.start
    return "\ufffd", error.end


codecs.register_error("gpt_prepare_replace", _count_and_replace)


@contextlib.contextmanager
def open_text(source: Input) -> Iterator[io.TextIOWrapper]:
    """The file's text, decompressed by its suffix, invalid UTF-8 replaced (and counted)."""
    with open(source.path, "rb", buffering=0) as f:
        binary = io.BufferedReader(_HashingReader(f, source), 1 << 20)
        decompress = DECOMPRESSORS.get(source.path.suffix)
        _current_input[:] = [source]
        try:
            yield io.TextIOWrapper(decompress(binary) if decompress else binary,
                                   encoding="utf-8", errors="gpt_prepare_replace", newline="")
        except (OSError, EOFError, lzma.LZMAError) as e:
            raise UserError(f"cannot read {source.path} ({e}): is it damaged, or not really "
                            f"{source.path.suffix or 'text'}?") from None


def split_point(text: str) -> int:
    """The last place where `text` can be cut without changing its tokens, or len(text).

    GPT-2's pre-tokenizer never joins characters across a newline that sits between
    two non-space characters, nor across the start of a space that does: cutting
    there gives the same tokens as the whole. (char and byte can be cut anywhere.)
    """
    for sep, offset in (("\n", 1), (" ", 0)):
        i = len(text) - 1
        while (i := text.rfind(sep, 0, i)) > 0:
            if not text[i - 1].isspace() and not text[i + 1].isspace():
                return i + offset
    return len(text)


def file_documents(source: Input, text_field: str) -> Iterator[tuple[str, bool]]:
    """(text, ends_document) pieces of one file: each JSON line, or the whole file, in pieces."""
    with open_text(source) as f:
        if source.is_jsonl:
            for where, record in jsonl_records(f, source.path):
                yield record_text(record, text_field, where), True
            return
        carry = ""
        while block := f.read(PIECE_CHARS):
            text = carry + block
            cut = split_point(text)
            if cut == len(text):
                carry = text  # no safe cut yet: keep reading (rare: a megabyte with no newline or space)
                continue
            carry = text[cut:]
            yield text[:cut], False
        yield carry, True


def jsonl_records(lines, source) -> Iterator[tuple[str, dict]]:
    """("FILE:LINE", record) for each non-blank line of a JSON Lines file; a line that is not a
    JSON object is refused with its place. Shared by this module and gpt.tasks.classify."""
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{source}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not valid JSON ({e.msg}): fix or remove the line") from None
        if not isinstance(record, dict):
            raise UserError(f"{where}: a JSON {type(record).__name__}, not an object with named fields")
        yield where, record


def record_text(record: dict, field: str, where: str) -> str:
    if field not in record:
        raise UserError(f"{where}: no {field!r} field (found: {', '.join(map(str, record))}): pass --text_field=NAME")
    if not isinstance(record[field], str):
        raise UserError(f"{where}: field {field!r} is {type(record[field]).__name__}, not text")
    return record[field]


def hf_documents(spec: str, text_field: str) -> Iterator[tuple[str, bool]]:
    """A Hugging Face dataset's train split, streamed: hf:NAME or hf:NAME:SUBSET."""
    try:
        import datasets
    except ImportError:
        raise UserError(f"{spec} needs the datasets package: pip install 'gpt[datasets]'") from None
    name, _, subset = spec.removeprefix("hf:").partition(":")
    try:
        rows = datasets.load_dataset(name, subset or None, split="train", streaming=True)
        for i, row in enumerate(rows):
            if text_field not in row:
                raise UserError(f"{spec} row {i}: no {text_field!r} field (found: {', '.join(row)}): "
                                f"pass --text_field=NAME")
            yield row[text_field], True
    except UserError:
        raise
    except Exception as e:  # network, unknown dataset, ...
        raise UserError(f"cannot read {spec} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def expand_inputs(inputs: list[str]) -> list[Input | str]:
    """Files (in the order given; directories and globs sorted) and hf: dataset names."""
    sources: list[Input | str] = []
    for arg in inputs:
        if arg.startswith("hf:"):
            sources.append(arg)
            continue
        if any(c in arg for c in "*?["):
            paths = [Path(p) for p in sorted(glob.glob(arg, recursive=True)) if Path(p).is_file()]
            if not paths:
                raise UserError(f"no files match {arg!r}: check the pattern")
        elif Path(arg).is_dir():
            root = Path(arg)
            paths = sorted(p for p in root.rglob("*")
                           if p.is_file() and not any(s.startswith(".") for s in p.relative_to(root).parts))
            if not paths:
                raise UserError(f"directory {arg} holds no files")
        elif Path(arg).is_file():
            paths = [Path(arg)]
        else:
            raise UserError(f"input {arg} does not exist: check the path")
        sources += [Input(p) for p in paths]
    if not sources:
        raise UserError("no inputs: name at least one file, directory, glob or hf:DATASET")
    return sources


def documents(sources: list[Input | str], text_field: str) -> Iterator[tuple[str, bool]]:
    for source in sources:
        if isinstance(source, str):
            yield from hf_documents(source, text_field)
        else:
            yield from file_documents(source, text_field)


# ---- tokenizing in worker processes ---------------------------------------------------------

_worker_tokenizer: Tokenizer | None = None


def _init_worker(spec: dict) -> None:
    global _worker_tokenizer
    _worker_tokenizer = from_spec(spec)


def encode_item(texts: list[str], ends: list[bool], dtype: str, tokenizer: Tokenizer | None = None):
    """Tokenize one work item: (all its tokens, tokens per piece). A piece that ends a
    document gets the end-of-text id."""
    tok = tokenizer or _worker_tokenizer
    pieces = [tok.encode_to_numpy(text) for text in texts]
    pieces = [np.append(ids, tok.eot_token) if end else ids for ids, end in zip(pieces, ends)]
    return np.concatenate(pieces).astype(dtype), [len(ids) for ids in pieces]


def work_items(pieces: Iterator[tuple[str, bool]], val_fraction: float, seed: int):
    """Group pieces into ~ITEM_CHARS items, deciding each document's split as it starts:
    yields (texts, ends, splits, documents started per split)."""
    rng = random.Random(seed)
    texts, ends, splits, chars = [], [], [], 0
    n_docs, split = 0, None
    for text, end in pieces:
        if split is None:  # a new document starts
            if not text and end:
                continue  # an empty document: nothing to write
            split = "val" if n_docs > 0 and rng.random() < val_fraction else "train"
            n_docs += 1
        texts.append(text)
        ends.append(end)
        splits.append(split)
        chars += len(text)
        if end:
            split = None
        if chars >= ITEM_CHARS:
            yield texts, ends, splits
            texts, ends, splits, chars = [], [], [], 0
    if texts:
        yield texts, ends, splits


# ---- the whole job -----------------------------------------------------------------------


def prepare(inputs: list[str], out: str | Path, tokenizer: str = "gpt2", *, val_fraction: float = 0.01,
            workers: int | None = None, seed: int = 0, text_field: str = "text", overwrite: bool = False,
            progress: bool | None = None) -> dict:
    """Tokenize `inputs` into `out`; return the metadata written to out/meta.json."""
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"--val_fraction must be in [0, 1), got {val_fraction}")
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    if tokenizer not in TOKENIZERS:
        raise UserError(f"unknown tokenizer {tokenizer!r}: choose one of {', '.join(TOKENIZERS)}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: name a directory for the dataset")
    existing = [n for n in ("meta.json", "train.bin", "val.bin") if (out / n).exists()]
    if existing and not overwrite:
        raise UserError(f"{out} already holds a dataset ({', '.join(existing)}): pass --overwrite or choose another --out")
    sources = expand_inputs(inputs)
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {out} cannot be created: {describe_os_error(e)}") from None
    for stale in out.glob(".*.tmp-*"):  # from a preparation killed while writing
        stale.unlink(missing_ok=True)
    try:
        with _terminate_cleanly():
            return _prepare(sources, inputs, out, tokenizer, val_fraction, workers, seed, text_field, progress)
    except BaseException:
        if created and not any(out.iterdir()):
            out.rmdir()  # nothing half-made is left behind: not even an empty directory
        raise


@contextlib.contextmanager
def _terminate_cleanly():
    """SIGTERM raises SystemExit here (in the main thread), so the temporary files go away."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _prepare(sources, inputs, out: Path, tokenizer: str, val_fraction: float, workers: int, seed: int,
             text_field: str, progress: bool | None) -> dict:
    """The work of prepare(), into an existing `out`."""
    t0 = time.perf_counter()
    if tokenizer == "char":  # its vocabulary is the corpus's characters: one pass to collect them
        chars: set[str] = set()
        for text, _ in documents(sources, text_field):
            chars.update(text)
        if not chars:
            raise UserError(f"no text in {', '.join(inputs)}: the corpus is empty")
        tok = get_tokenizer("char", text="".join(chars))
        sources = expand_inputs(inputs)  # fresh counters for the pass that counts
    else:
        tok = get_tokenizer(tokenizer)
    dtype = "uint16" if tok.vocab_size <= 1 << 16 else "uint32"

    (out / "meta.json").unlink(missing_ok=True)  # an overwritten dataset is unfinished until the end
    counts = {s: {"tokens": 0, "documents": 0} for s in SPLITS}
    files = [s for s in sources if isinstance(s, Input)]
    with ExitStack() as stack:
        paths = {s: stack.enter_context(atomic_path(out / f"{s}.bin")) for s in SPLITS}
        sinks = {s: stack.enter_context(open(paths[s], "wb")) for s in SPLITS}
        bar = stack.enter_context(_progress_bar(sum(f.size for f in files), progress))
        items = work_items(documents(sources, text_field), val_fraction, seed)
        if workers == 1:
            results = ((encode_item(t, e, dtype, tok), s, e) for t, e, s in items)
        else:
            ctx = multiprocessing.get_context("spawn")  # safe with threads; workers import no torch
            pool = stack.enter_context(ctx.Pool(workers, initializer=_init_worker, initargs=(tok.spec(),)))
            results = _in_order(pool, items, dtype, max_in_flight=2 * workers)
        for (tokens, lengths), splits, ends in results:
            offset = 0
            for n, split, end in zip(lengths, splits, ends):
                tokens[offset : offset + n].tofile(sinks[split])
                counts[split]["tokens"] += n
                counts[split]["documents"] += end
                offset += n
            bar.update(sum(f.bytes_read for f in files) - bar.n)
            bar.set_postfix_str(f"{(counts['train']['tokens'] + counts['val']['tokens']) / (time.perf_counter() - t0):,.0f} tok/s")
        if counts["train"]["tokens"] == 0:
            raise UserError(f"no text in {', '.join(inputs)}: the corpus is empty")
        for f in sinks.values():
            f.close()
        val_split = "documents"
        if val_fraction > 0 and counts["val"]["tokens"] == 0:
            val_split = "tail"
            _split_off_tail(paths, counts, dtype, val_fraction)

    meta = {
        "format_version": FORMAT_VERSION,
        "tokenizer": tok.spec(),
        "vocab_size": tok.vocab_size,
        "eot_token": tok.eot_token,
        "dtype": dtype,
        **counts,
        "val_fraction": val_fraction,
        "val_split": val_split,
        "seed": seed,
        "text_field": text_field,
        "inputs": [s.record() if isinstance(s, Input) else {"hf": s} for s in sources],
        "replaced_bytes": sum(f.replaced_bytes for f in files),
    }
    with atomic_path(out / "meta.json") as tmp:
        tmp.write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
    _report(out, meta, time.perf_counter() - t0)
    return meta


def _in_order(pool, items, dtype, max_in_flight):
    """Results of encode_item for each item, in input order, with a bounded number in flight."""
    pending = collections.deque()
    for texts, ends, splits in items:
        pending.append((pool.apply_async(encode_item, (texts, ends, dtype)), splits, ends))
        if len(pending) >= max_in_flight:
            result, splits_, ends_ = pending.popleft()
            yield result.get(), splits_, ends_
    while pending:
        result, splits_, ends_ = pending.popleft()
        yield result.get(), splits_, ends_


def _split_off_tail(paths: dict, counts: dict, dtype: str, val_fraction: float) -> None:
    """No whole document fell into validation: move the last val_fraction of the tokens there."""
    n = counts["train"]["tokens"]
    k = max(1, round(n * val_fraction))
    if k >= n:
        print(f"note: {n} token(s) are too few to split: the validation split is empty", file=sys.stderr)
        return
    train = np.memmap(paths["train"], dtype=dtype, mode="r")
    train[n - k :].tofile(paths["val"])
    del train
    os.truncate(paths["train"], (n - k) * np.dtype(dtype).itemsize)
    counts["train"]["tokens"], counts["val"]["tokens"] = n - k, k
    print(f"note: no whole document went to validation ({counts['train']['documents']} document(s)); "
          f"the last {k:,} tokens ({val_fraction:.1%}) of the text are the validation split instead",
          file=sys.stderr)


def _progress_bar(total_bytes: int, enabled: bool | None):
    from tqdm import tqdm

    # enabled None: only on a terminal
    return tqdm(total=total_bytes or None, unit="B", unit_scale=True, desc="prepare",
                disable=None if enabled is None else not enabled, dynamic_ncols=True)


def _report(out: Path, meta: dict, seconds: float) -> None:
    total = meta["train"]["tokens"] + meta["val"]["tokens"]
    print(f"prepared {out}: train {meta['train']['tokens']:,} tokens ({meta['train']['documents']:,} docs), "
          f"val {meta['val']['tokens']:,} tokens ({meta['val']['documents']:,} docs), "
          f"{meta['tokenizer']['name']} vocab {meta['vocab_size']:,}, {meta['dtype']}, "
          f"{seconds:.1f}s ({total / max(seconds, 1e-9):,.0f} tokens/s)")
    if meta["replaced_bytes"]:
        bad = [f"{i['path']} ({i['replaced_bytes']:,})" for i in meta["inputs"] if i.get("replaced_bytes")]
        print(f"warning: {meta['replaced_bytes']:,} bytes were not valid UTF-8 and became U+FFFD: "
              f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}", file=sys.stderr)


# ---- the shipped corpora ---------------------------------------------------------------------


def ensure_prepared(corpus_dir: str | Path, tokenizer: str, *, val_fraction: float = 0.1, seed: int = 0) -> Path:
    """The prepared directory corpus_dir/TOKENIZER, made from corpus_dir/texts on first use.

    This is how a config that names a shipped corpus (data/shakespeare) needs no
    separate preparation step.
    """
    corpus_dir = Path(corpus_dir)
    out = corpus_dir / tokenizer
    if (out / "meta.json").exists():
        return out
    texts = corpus_dir / "texts"
    if not texts.is_dir():
        raise UserError(f"{out} is not prepared and {texts} does not exist: "
                        f"run python -m gpt.prepare INPUT... --out={out} --tokenizer={tokenizer}")
    print(f"preparing {texts} with the {tokenizer} tokenizer (first use) ...", file=sys.stderr)
    prepare([str(texts)], out, tokenizer, val_fraction=val_fraction, seed=seed, overwrite=True)
    return out


# ---- command line ----------------------------------------------------------------------------


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(prog="python -m gpt.prepare", description=__doc__.split("\n\n")[0],
                                epilog="INPUT: files, .gz/.bz2/.xz files, .jsonl files, directories, globs, hf:NAME[:SUBSET]")
    p.add_argument("inputs", nargs="+", metavar="INPUT")
    p.add_argument("--out", required=True, help="directory for train.bin, val.bin, meta.json")
    p.add_argument("--tokenizer", default="gpt2", help="gpt2 (default), char or byte")
    p.add_argument("--val_fraction", type=float, default=0.01, help="share of documents for validation (default 0.01)")
    p.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: all cores)")
    p.add_argument("--seed", type=int, default=0, help="chooses the validation documents (default 0)")
    p.add_argument("--text_field", default="text", help="the text field of JSON Lines inputs (default text)")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out")
    args = p.parse_args(argv)
    prepare(args.inputs, args.out, args.tokenizer, val_fraction=args.val_fraction, workers=args.workers,
            seed=args.seed, text_field=args.text_field, overwrite=args.overwrite)


if __name__ == "__main__":
    main()
