"""The memory-mapped token dataset, the resumable rank-aware sampler, evaluation
windows, and the checks that refuse data a model cannot read."""

import json

import numpy as np
import pytest
import torch

from gpt.dataset import TokenDataset, WindowSampler, eval_indices, load_meta
from gpt.system import to_device
from gpt.errors import UserError
from gpt.prepare import prepare


@pytest.fixture
def prepared(char_data):
    return char_data


def test_batches_are_windows_shifted_by_one(prepared):
    data = TokenDataset(prepared, "train")
    tokens = np.fromfile(prepared / "train.bin", dtype=np.uint16)
    assert isinstance(data.tokens, np.memmap) and len(data) == len(tokens)
    T = 64
    x, y = data.batch(np.array([0, 5, 2]), T)
    assert x.shape == y.shape == (3, T) and x.dtype == y.dtype == torch.int64
    for row, i in enumerate([0, 5, 2]):
        window = tokens[i * (T + 1) : (i + 1) * (T + 1)]
        assert x[row].tolist() == window[:-1].tolist() and y[row].tolist() == window[1:].tolist()
    x_dev, y_dev = to_device((x, y), "cpu")
    assert torch.equal(x_dev, x) and torch.equal(y_dev, y)


def take(sampler, steps):
    return [sampler.next_indices().tolist() for _ in range(steps)]


def test_every_window_once_per_epoch_in_a_seeded_shuffled_order():
    sampler = WindowSampler(100, 7, seed=3)
    stream = sum(take(sampler, 30), [])  # 210 indices: two full epochs and a bit
    assert sorted(stream[:100]) == list(range(100)) and sorted(stream[100:200]) == list(range(100))
    assert stream[:100] != list(range(100)) and stream[:100] != stream[100:200]  # shuffled, anew each epoch
    assert sampler.epoch == 2
    assert sum(take(WindowSampler(100, 7, seed=3), 30), []) == stream  # deterministic
    assert sum(take(WindowSampler(100, 7, seed=4), 30), []) != stream


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_ranks_get_disjoint_shares_that_cover_every_window(world_size):
    n, batch = 60, 4
    samplers = [WindowSampler(n, batch, seed=5, rank=r, world_size=world_size) for r in range(world_size)]
    per_rank = [sum(take(s, 30), []) for s in samplers]
    # rank r's k-th batch is the r-th block of the k-th global batch of one shared stream
    stream = []
    for k in range(30):
        for r in range(world_size):
            stream += per_rank[r][k * batch : (k + 1) * batch]
    epochs = [stream[i : i + n] for i in range(0, len(stream) - n + 1, n)]
    assert len(epochs) >= 2
    for epoch in epochs:
        assert sorted(epoch) == list(range(n))  # complete and disjoint within each epoch
    # the same stream whatever the world size: changing W keeps the data order
    single = sum(take(WindowSampler(n, batch * world_size, seed=5), 30), [])
    assert stream == single


def test_resume_from_state_gives_exactly_the_next_batches(prepared):
    data = TokenDataset(prepared, "train")
    T = 32
    n = data.num_windows(T)
    uninterrupted = WindowSampler(n, 8, seed=11, rank=1, world_size=2)
    batches = [data.batch(uninterrupted.next_indices(), T) for _ in range(12)]

    first = WindowSampler(n, 8, seed=11, rank=1, world_size=2)
    for _ in range(5):
        first.next_indices()
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint
    resumed = WindowSampler(n, 8, seed=11, rank=1, world_size=2)
    resumed.load_state_dict(state)
    for k in range(5, 12):
        x, y = data.batch(resumed.next_indices(), T)
        assert torch.equal(x, batches[k][0]) and torch.equal(y, batches[k][1])


def test_resume_refuses_a_different_sampler():
    state = WindowSampler(100, 4, seed=1).state_dict()
    with pytest.raises(UserError, match="does not match this run's"):
        WindowSampler(101, 4, seed=1).load_state_dict(state)


def test_eval_windows_are_fixed_spread_and_shared_out_by_rank():
    batches = eval_indices(1000, 4, 5)
    assert [b.tolist() for b in batches] == [b.tolist() for b in eval_indices(1000, 4, 5)]
    flat = np.concatenate(batches)
    assert flat.min() == 0 and flat.max() == 999 and len(set(flat.tolist())) == 20
    for world in (2, 3, 7, 30):  # the same 20 windows on any number of processes, shared out
        shares = [eval_indices(1000, 4, 5, rank=r, world_size=world) for r in range(world)]
        assert len({len(batches) for batches in shares}) == 1  # as many batches (forwards) in every process
        dealt = np.concatenate([b for batches in shares for b in batches])
        assert sorted(dealt.tolist()) == sorted(flat.tolist())  # each window once, none added
        assert max(len(np.concatenate(batches)) for batches in shares) - min(
            len(np.concatenate(batches)) for batches in shares) <= 1  # evenly


# ---- data the model cannot read -----------------------------------------------------------


def test_vocab_size_mismatch(prepared):
    data = TokenDataset(prepared, "train")
    with pytest.raises(UserError, match=r"model's vocab_size \(50257\) differs from the data's \(\d+, char"):
        data.check(block_size=64, vocab_size=50257)
    data.check(block_size=64, vocab_size=data.vocab_size)


def test_split_shorter_than_one_window(tmp_path):
    (tmp_path / "a.txt").write_text("a tiny corpus")
    prepare([str(tmp_path / "a.txt")], tmp_path / "out", "byte", val_fraction=0.0, workers=1)
    with pytest.raises(UserError, match="fewer than one window of block_size \\+ 1 = 257: lower block_size"):
        TokenDataset(tmp_path / "out", "train").check(block_size=256)


def test_missing_meta_json(tmp_path):
    with pytest.raises(UserError, match="has no meta.json: prepare it with python -m gpt.prepare"):
        TokenDataset(tmp_path, "train")


def copy_dataset(src, dst):
    dst.mkdir()
    for name in ("meta.json", "train.bin", "val.bin"):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


@pytest.mark.parametrize(
    "split, extra, message",
    [("train", b"\0", "not a whole number of uint16 tokens"), ("val", b"\0\0", "meta.json says")],
    ids=["size not a multiple of the dtype", "token count not meta.json's"],
)
def test_damaged_token_files(prepared, tmp_path, split, extra, message):
    bad = copy_dataset(prepared, tmp_path / "bad")
    with open(bad / f"{split}.bin", "ab") as f:
        f.write(extra)
    with pytest.raises(UserError, match=message):
        TokenDataset(bad, split)


def test_unknown_dtype_in_meta(prepared, tmp_path):
    bad = copy_dataset(prepared, tmp_path / "bad")
    meta = load_meta(bad)
    (bad / "meta.json").write_text(json.dumps({**meta, "dtype": "float64"}))
    with pytest.raises(UserError, match="dtype 'float64' is not one of uint16, uint32"):
        TokenDataset(bad, "train")
