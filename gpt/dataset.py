"""Token data for training, read from a directory written by `python -m gpt.prepare`.

    train = TokenDataset("data/shakespeare/char", "train")
    train.check(block_size=256, vocab_size=model.config.vocab_size)
    sampler = WindowSampler(train.num_windows(256), batch_size=64, seed=1337, rank=0, world_size=1)
    x, y = to_device(train.batch(sampler.next_indices(), 256), device)   # (64, 256) int64 each

The data is cut into non-overlapping windows of block_size + 1 tokens: x is a
window's first block_size tokens, y the same shifted by one. The token file is
memory-mapped, never read whole, so a corpus may be far larger than RAM.

WindowSampler decides which windows each step reads: every window once per
epoch, in a seeded shuffled order, a disjoint share for each rank under DDP.
Its whole state is one number, which the trainer checkpoints, so a resumed run
reads exactly the batches an uninterrupted run would have read.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from gpt.errors import UserError
from gpt.model import pad_sequences

FORMAT_VERSION = 1
DTYPES = ("uint16", "uint32")


def load_meta(data_dir: str | Path) -> dict:
    """meta.json of a prepared directory, checked."""
    path = Path(data_dir) / "meta.json"
    if not path.exists():
        raise UserError(f"{data_dir} has no meta.json: prepare it with "
                        f"python -m gpt.prepare INPUT... --out={data_dir} --tokenizer=NAME")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is damaged ({e.msg}, line {e.lineno}): prepare the data again") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path} has format version {meta.get('format_version')!r}, this code reads "
                        f"{FORMAT_VERSION}: prepare the data again with this version")
    if meta.get("dtype") not in DTYPES:
        raise UserError(f"{path}: dtype {meta.get('dtype')!r} is not one of {', '.join(DTYPES)}: prepare the data again")
    return meta


class TokenDataset:
    """One split ("train" or "val") of a prepared directory, memory-mapped."""

    def __init__(self, data_dir: str | Path, split: str = "train"):
        self.meta = load_meta(data_dir)
        self.split = split
        self.path = Path(data_dir) / f"{split}.bin"
        if not self.path.exists():
            raise UserError(f"{self.path} is missing: prepare the data again")
        dtype = np.dtype(self.meta["dtype"])
        size = self.path.stat().st_size
        if size % dtype.itemsize:
            raise UserError(f"{self.path} is {size:,} bytes, not a whole number of {dtype} tokens "
                            f"({dtype.itemsize} bytes each): the file is damaged; prepare the data again")
        expected = self.meta.get(split, {}).get("tokens")
        if size // dtype.itemsize != expected:
            raise UserError(f"{self.path} holds {size // dtype.itemsize:,} tokens but meta.json says {expected}: "
                            f"the files do not belong together; prepare the data again")
        self.tokens = np.memmap(self.path, dtype=dtype, mode="r") if size else np.zeros(0, dtype)
        self.vocab_size: int = self.meta["vocab_size"]

    def __len__(self) -> int:
        return len(self.tokens)

    def num_windows(self, block_size: int) -> int:
        return len(self.tokens) // (block_size + 1)

    def check(self, block_size: int, vocab_size: int | None = None) -> None:
        """Refuse a model that cannot read this data: another vocabulary, or no whole window."""
        if vocab_size is not None and vocab_size != self.vocab_size:
            raise UserError(
                f"the model's vocab_size ({vocab_size}) differs from the data's ({self.vocab_size}, "
                f"{self.meta['tokenizer']['name']} tokenizer, {self.path.parent}/meta.json): use "
                f"vocab_size = {self.vocab_size}, or prepare the data with the model's tokenizer"
            )
        if self.num_windows(block_size) < 1:
            raise UserError(
                f"{self.path} has {len(self.tokens):,} tokens, fewer than one window of block_size + 1 = "
                f"{block_size + 1}: lower block_size or add data"
            )

    def batch(self, indices, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Windows `indices` as (x, y): int64 (len(indices), block_size) each, y = x shifted by one."""
        w = block_size + 1
        rows = np.stack([self.tokens[i * w : (i + 1) * w] for i in indices]).astype(np.int64)
        return torch.from_numpy(rows[:, :-1].copy()), torch.from_numpy(rows[:, 1:].copy())


class WindowSampler:
    """The window indices of each step: shuffled, disjoint across ranks, exactly resumable.

    All ranks walk one stream: a permutation of all windows for epoch 0, then a new
    one for epoch 1, ... (each seeded by (seed, epoch)). Each call takes the stream's
    next batch_size * world_size indices, and rank r keeps the r-th batch_size of them.
    So every window is read once per epoch, no two ranks read the same window in an
    epoch, and the state is one number: the stream position.
    """

    def __init__(self, num_windows: int, batch_size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1):
        if num_windows < 1:
            raise UserError("no windows to sample: the split is shorter than block_size + 1 tokens")
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad sampler settings: batch_size={batch_size}, rank={rank}, world_size={world_size}")
        self.num_windows, self.batch_size = num_windows, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.position = 0  # stream indices consumed by all ranks together
        self._epoch, self._perm = -1, np.zeros(0, np.int64)

    @property
    def epoch(self) -> int:
        return self.position // self.num_windows

    def next_indices(self) -> np.ndarray:
        start = self.position + self.rank * self.batch_size
        self.position += self.batch_size * self.world_size
        return self._stream(start, self.batch_size)

    def _stream(self, start: int, count: int) -> np.ndarray:
        parts = []
        while count:
            epoch, offset = divmod(start, self.num_windows)
            part = self._permutation(epoch)[offset : offset + count]
            parts.append(part)
            start, count = start + len(part), count - len(part)
        return np.concatenate(parts)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
        return self._perm

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed, "num_windows": self.num_windows}

    def load_state_dict(self, state: dict) -> None:
        if (state["seed"], state["num_windows"]) != (self.seed, self.num_windows):
            raise UserError(
                f"the checkpoint's data sampler (seed {state['seed']}, {state['num_windows']:,} windows) does not "
                f"match this run's (seed {self.seed}, {self.num_windows:,} windows): resume with the same data, "
                f"block_size and seed"
            )
        self.position = int(state["position"])


def eval_indices(num_windows: int, batch_size: int, n_batches: int, *, rank: int = 0, world_size: int = 1) -> list[np.ndarray]:
    """A fixed set of evaluation batches spread evenly over a split; each rank gets its share.

    The same arguments always give the same windows, so evaluations are comparable.
    """
    total = batch_size * n_batches * world_size
    spread = np.linspace(0, num_windows - 1, total).round().astype(np.int64)
    mine = spread[rank::world_size]
    return [mine[i * batch_size : (i + 1) * batch_size] for i in range(n_batches)]


def to_device(batch: tuple[torch.Tensor, ...], device: torch.device | str) -> tuple[torch.Tensor, ...]:
    """Tensors to the device; on CUDA through pinned memory, without waiting for the copy."""
    device = torch.device(device)
    if device.type == "cuda":
        return tuple(t.pin_memory().to(device, non_blocking=True) for t in batch)
    return tuple(t.to(device) for t in batch)


# ---- labelled text for classification -------------------------------------------------------------


def read_labeled(path: str | Path, text_column: str, label_column: str | None) -> tuple[list[str], list, int]:
    """(texts, labels, skipped) from a CSV, TSV or JSON Lines file with a header / keys.

    Labels are kept as strings ("1" and 1 are the same label); label_column None reads
    texts only (labels are then None). Rows whose text is empty are skipped and counted.
    Errors name the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"labelled data file {path} does not exist: check classify.train_file / val_file / test_file")
    rows = _jsonl_rows(path) if ".jsonl" in path.suffixes else _csv_rows(path)
    texts, labels, skipped = [], [], 0
    for where, row in rows:
        missing = [c for c in (text_column, label_column) if c is not None and c not in row]
        if missing:
            raise UserError(f"{where}: no column {missing[0]!r} (columns found: {', '.join(map(str, row))}): "
                            f"name the right text and label columns")
        text = row[text_column]
        if text is None or not str(text).strip():
            skipped += 1
            continue
        label = None if label_column is None else row[label_column]
        if label_column is not None and (label is None or str(label).strip() == ""):
            raise UserError(f"{where}: the label is empty: every row needs a label")
        texts.append(str(text))
        labels.append(None if label is None else str(label).strip())
    if not texts:
        raise UserError(f"{path} holds no rows with text")
    return texts, labels, skipped


def _csv_rows(path: Path):
    import csv

    delimiter = "\t" if path.suffix in (".tsv", ".tab") else ","
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.reader(f, delimiter=delimiter)
        header = next(reader, None)
        if not header:
            raise UserError(f"{path} is empty: it needs a header row naming its columns")
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if not row:
                continue
            if len(row) != len(header):
                raise UserError(f"{where}: {len(row)} fields where the header has {len(header)}: "
                                f"fix the line (quote fields that contain the delimiter)")
            yield where, dict(zip(header, row))


def _jsonl_rows(path: Path):
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: not valid JSON ({e.msg}): fix or remove the line") from None
            if not isinstance(row, dict):
                raise UserError(f"{where}: a JSON {type(row).__name__}, not an object with named fields")
            yield where, row


def stratified_split(labels: list[str], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Row indices (train, val): `fraction` of each label's rows, chosen from `seed`, go to val."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label in sorted(set(labels)):
        rows = [i for i, lab in enumerate(labels) if lab == label]
        rng.shuffle(rows)
        n_val = int(round(len(rows) * fraction))
        if 0 < fraction and n_val == 0 and len(rows) > 1:
            n_val = 1
        val += rows[:n_val]
        train += rows[n_val:]
    return sorted(train), sorted(val)


class ClassificationData:
    """Tokenised texts and label ids; batches padded to their longest text."""

    def __init__(self, texts: list[str], label_ids: list[int], tokenizer, block_size: int, truncate: str = "head"):
        self.tokens = []
        for text in texts:
            ids = tokenizer.encode(text)
            self.tokens.append(ids[:block_size] if truncate == "head" else ids[-block_size:])
        self.labels = torch.tensor(label_ids, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.tokens)

    def batch(self, indices, pad_id: int = 0, left: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(idx, attention_mask, labels) for rows `indices`: (B, longest) ids, 1/0 mask, (B,) labels."""
        idx, mask = pad_sequences([self.tokens[i] for i in indices], pad_id, left=left)
        return idx, mask, self.labels[torch.as_tensor(indices, dtype=torch.long)]
