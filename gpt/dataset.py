"""Token data for training, read from a directory written by `python -m gpt.prepare`.

    train = TokenDataset("data/shakespeare/char", "train")
    train.check(block_size=256, vocab_size=model.config.vocab_size)
    sampler = WindowSampler(train.num_windows(256), batch_size=64, seed=1337, rank=0, world_size=1)
    x, y = train.batch(sampler.next_indices(), 256)   # (64, 256) int64 each (gpt.system.to_device moves them)

The data is cut into non-overlapping windows of block_size + 1 tokens: x is a
window's first block_size tokens, y the same shifted by one. The token file is
memory-mapped, never read whole, so a corpus may be far larger than RAM.

WindowSampler decides which windows each step reads: every window once per
epoch, in a seeded shuffled order, a disjoint share for each rank under DDP.
Its whole state is one number, which every checkpoint holds, so a resumed run
reads exactly the batches an uninterrupted run would have read.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from gpt.errors import UserError

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
        """Refuse a model that cannot read this data: another vocabulary, token ids it has no
        embedding for (a damaged or foreign file), or no whole window."""
        if vocab_size is not None and vocab_size != self.vocab_size:
            raise UserError(
                f"the model's vocab_size ({vocab_size}) differs from the data's ({self.vocab_size}, "
                f"{self.meta['tokenizer']['name']} tokenizer, {self.path.parent}/meta.json): use "
                f"vocab_size = {self.vocab_size}, or prepare the data with the model's tokenizer"
            )
        largest = self.max_token()
        if largest >= self.vocab_size:
            raise UserError(f"{self.path} holds token id {largest:,}, but the vocabulary has {self.vocab_size:,} ids "
                            f"(meta.json): the files are damaged or do not belong together; prepare the data again")
        if self.num_windows(block_size) < 1:
            raise UserError(
                f"{self.path} has {len(self.tokens):,} tokens, fewer than one window of block_size + 1 = "
                f"{block_size + 1}: lower block_size or add data"
            )

    def max_token(self, chunk: int = 1 << 26) -> int:
        """The largest token id in the file (-1 if empty), read in chunks of `chunk` tokens, so a
        corpus larger than memory is checked too (about a second per GB)."""
        return max((int(self.tokens[i : i + chunk].max()) for i in range(0, len(self.tokens), chunk)), default=-1)

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

    def next_positions(self) -> np.ndarray:
        """The stream positions of the windows next_indices returns next: a window's place in the
        data stream, the same on any number of processes (gpt/objectives.py seeds masks with it)."""
        return self.position + self.rank * self.batch_size + np.arange(self.batch_size)

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
    """Rank `rank`'s share of a fixed set of evaluation windows: batch_size x n_batches windows
    spread evenly over a split, the same set whatever the number of processes (so evaluations
    compare, and a run resumed on another number of processes is measured on the same windows).

    The set is dealt out window by window; every rank gets the same number of batches (the
    processes of a sharded model run each forward together), so a rank's last batch may be
    short, or empty when it has nothing left: run a stand-in then, and do not count it.
    """
    total = batch_size * n_batches
    spread = np.linspace(0, num_windows - 1, total).round().astype(np.int64)
    mine = spread[rank::world_size]
    largest_share = -(-total // world_size)
    return [mine[i * batch_size : (i + 1) * batch_size] for i in range(-(-largest_share // batch_size))]
