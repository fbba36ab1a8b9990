"""Looking inside a model: gpt.evaluate (loss, perplexity, bits per byte, by context and position)
and gpt.inspect (attention maps), checked against hand computations and the trainer's own figures."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train
from gpt import GPT, GPTConfig
from gpt import evaluate as ev
from gpt import inspect as ins
from gpt.checkpoint import load_checkpoint
from gpt.dataset import TokenDataset
from gpt.tokenizer import get_tokenizer


TEXT = "Ô Roméo, Roméo! pourquoi es-tu Roméo? Renie ton père et abdique ton nom."


@pytest.fixture(scope="module")
def tiny():
    """A random tiny char model and a text with multi-byte characters and an end-of-text id."""
    torch.manual_seed(0)
    tok = get_tokenizer("char", text=TEXT)
    model = GPT(GPTConfig(block_size=16, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=16)).eval()
    ids = np.array(tok.encode(TEXT) + [tok.eot_token] + tok.encode(TEXT[:30]), dtype=np.int64)
    return model, tok, ids


def hand_scores(model, ids, context, stride):
    """Loss (nats) of every scored target, by an explicit loop: one forward per target, on exactly
    the tokens of its window that come before it."""
    scored = {}
    for start, length, first in ev.windows(len(ids), context, stride):
        for p in range(first, length):
            t = start + p + 1
            x = torch.tensor(ids[start:t])[None]
            logits = model.logits(model.hidden_states(x))[0, -1]
            assert t not in scored
            scored[t] = -F.log_softmax(logits.double(), -1)[ids[t]].item()
    return scored


@pytest.mark.parametrize("context, stride", [(8, 8), (8, 3), (16, 16), (5, 1), (8, 9), (3, 4)])
def test_bits_per_byte_equals_a_hand_computation(tiny, context, stride):
    model, tok, ids = tiny
    scored = hand_scores(model, ids, context, stride)
    nats = sum(scored.values())
    n_bytes = sum(len(tok.token_bytes(int(ids[t]))) for t in scored)  # é is two bytes, end-of-text none
    got = ev.evaluate_tokens(model, ids, "text", context, stride, byte_lengths=tok.byte_lengths(), batch_size=3)
    assert got.tokens == len(scored) and got.bytes == n_bytes
    assert got.bits_per_byte == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-5)
    assert got.perplexity == pytest.approx(math.exp(nats / len(scored)), rel=1e-5)
    if stride <= context:
        assert n_bytes != len(scored)  # the test really weighs bytes, not tokens


@pytest.mark.parametrize("n, context, stride", [(2, 4, 4), (100, 8, 8), (100, 8, 3), (101, 10, 1), (37, 64, 64),
                                                (1000, 128, 100), (50, 7, 7)])
def test_windows_score_every_token_exactly_once(n, context, stride):
    targets = []
    for start, length, first in ev.windows(n, context, stride):
        assert 1 <= length <= context and 0 <= first < length
        targets += [start + p + 1 for p in range(first, length)]  # each sees p + 1 <= context tokens
    assert sorted(targets) == list(range(1, n))
    if stride == context:
        assert all(first == 0 for _, _, first in ev.windows(n, context, stride))


def test_the_training_layout_is_whole_windows_of_context_plus_one():
    found = ev.windows(100, 8, 9)
    assert found == [(9 * k, 8, 0) for k in range(11)]  # 100 // 9 = 11 windows; the tail of 1 token is not read


def test_the_runs_val_split_gives_the_trainers_val_loss(char_data, tmp_path, capsys):
    """With the trainer's layout (stride = context + 1) and all of its windows, evaluate equals the
    validation loss the trainer logged for the same weights."""
    T = 16
    n_windows = TokenDataset(char_data, "val").num_windows(T)
    out = tmp_path / "run"
    train.main([f"--data.dir={char_data}", f"--run.out_dir={out}", "--model.n_layer=1", "--model.n_head=2",
                "--model.n_embd=16", f"--model.block_size={T}", "--max_iters=2", "--eval.eval_interval=2",
                "--eval.eval_iters=1", f"--batch.batch_size={n_windows}", "--log.plot=false"])
    logged = load_checkpoint(out / "ckpt.pt")["metrics"]["val_loss"]
    ev.main([f"--out_dir={out}", "--ckpt=ckpt.pt", f"--context={T}", f"--stride={T + 1}", f"--json={tmp_path / 'e.json'}"])
    (result,) = json.loads((tmp_path / "e.json").read_text())
    assert result["tokens"] == n_windows * T
    assert result["loss"] == pytest.approx(logged, rel=1e-5)
    assert "bits/byte" in capsys.readouterr().out


def test_the_explicit_attention_equals_the_fused_kernel(tiny):
    model, _, ids = tiny
    x = torch.tensor(ids[:16])[None].repeat(2, 1)
    fused = model.hidden_states(x)
    probs = model.attention_probabilities(x)  # runs the same blocks with the explicit path
    for block in model.transformer.h:
        block.attn.keep_probs = True
    try:
        explicit = model.hidden_states(x)
    finally:
        for block in model.transformer.h:
            block.attn.keep_probs = False
    torch.testing.assert_close(explicit, fused, rtol=1e-5, atol=1e-5)
    assert probs.shape == (2, 2, 2, 16, 16)  # layers, batch, heads, queries, keys
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 2, 2, 16))
    assert torch.all(probs.triu(1) == 0)  # no query sees a later key
    # with left padding too: padding keys get no attention
    mask = torch.ones_like(x)
    mask[0, :5] = 0
    padded = model.attention_probabilities(x, attention_mask=mask)
    assert torch.all(padded[:, 0, :, 5:, :5] == 0) and torch.all(padded[:, 1] == probs[:, 1])


def test_head_statistics_by_hand():
    probs = torch.zeros(1, 1, 1, 3, 3)
    probs[0, 0, 0] = torch.tensor([[1.0, 0, 0], [0.5, 0.5, 0], [0.0, 1.0, 0]])
    stats = ins.head_statistics(probs)
    assert stats["mean attention distance (tokens back)"][0, 0] == pytest.approx((0 + 0.5 + 1) / 3)
    assert stats["attention entropy (nats)"][0, 0] == pytest.approx(math.log(2) / 3)
    assert stats["attention on the first token"][0, 0] == pytest.approx(0.25)


def test_head_statistics_of_attention_both_ways_count_later_tokens():
    probs = torch.zeros(1, 1, 1, 3, 3)
    probs[0, 0, 0] = torch.tensor([[0.0, 1.0, 0], [0.5, 0, 0.5], [1.0, 0, 0]])
    stats = ins.head_statistics(probs, both_ways=True)
    assert stats["mean attention distance (tokens either side)"][0, 0] == pytest.approx((1 + 1 + 2) / 3)


def test_a_masked_lm_is_drawn_both_ways(char_data, tmp_path, capsys, monkeypatch):
    import gpt.plot
    from gpt.checkpoint import load_model

    out = tmp_path / "mlm"
    train.main([f"--data.dir={char_data}", f"--run.out_dir={out}", "--model.n_layer=2", "--model.n_head=2",
                "--model.n_embd=16", "--model.block_size=32", "--max_iters=2", "--eval.eval_iters=1",
                "--log.plot=false", "--lm.objective=mlm"])
    drawn = {}
    monkeypatch.setattr(gpt.plot, "plot_attention", lambda probs, *a, causal: drawn.update(probs=probs, causal=causal))
    ins.main([f"--out_dir={out}", "--prompt=ROMEO: But soft", "--summary"])
    assert "tokens either side" in capsys.readouterr().out and drawn["causal"] is False
    model, tok, _ = load_model(out / "best.pt")
    ids = torch.tensor([tok.encode("ROMEO: But soft")])
    expected = model.attention_probabilities(ids, prefix=ids.size(1))[:, 0]
    torch.testing.assert_close(torch.from_numpy(drawn["probs"]), expected)
    assert expected.triu(1).sum() > 1  # later tokens get attention
    torch.testing.assert_close(expected.sum(-1), torch.ones_like(expected.sum(-1)))


def test_token_labels_are_readable():
    tok = get_tokenizer("gpt2")
    assert [ins.token_label(tok, t) for t in tok.encode("Hi there\n\tyou")] == ["Hi", "␣there", "\\n", "\\t", "you"]
    assert ins.token_label(tok, tok.eot_token) == "<eot>"


def _picture(path):
    import matplotlib.image

    image = matplotlib.image.imread(path)
    colours = np.unique(image.reshape(-1, image.shape[-1]), axis=0)
    return image.shape, len(colours)


def test_the_pictures_are_written_and_not_blank(char_data, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "run"
    train.main([f"--data.dir={char_data}", f"--run.out_dir={out}", "--model.n_layer=2", "--model.n_head=2",
                "--model.n_embd=16", "--model.block_size=32", "--max_iters=4", "--eval.eval_interval=4",
                "--eval.eval_iters=1", "--log.plot=true"])
    ev.main([f"--out_dir={out}", "--context=8,16,32", "--plot"])
    long_prompt = "ROMEO: " * 10  # 70 characters, more than block_size = 32
    ins.main([f"--out_dir={out}", f"--prompt={long_prompt}", "--summary", "--heads=1"])
    assert "drawing its last 32" in capsys.readouterr().err
    for name in ("loss.png", "evaluation.png", "attention.png", "attention_summary.png"):
        (height, width, _), colours = _picture(out / name)
        assert height > 200 and width > 200 and colours > 10, name


@pytest.mark.slow
def test_under_torchrun_the_windows_are_split_and_summed_exactly(char_data, tmp_path):
    import os
    import subprocess
    import sys

    from conftest import ROOT

    out = tmp_path / "run"
    train.main([f"--data.dir={char_data}", f"--run.out_dir={out}", "--model.n_layer=1", "--model.n_head=2",
                "--model.n_embd=16", "--model.block_size=16", "--max_iters=2", "--eval.eval_iters=1", "--log.plot=false"])
    common = ["-m", "gpt.evaluate", f"--out_dir={out}", "--ckpt=ckpt.pt", "--context=8,16", "--batch_size=5"]
    one = subprocess.run([sys.executable, *common, f"--json={tmp_path / 'one.json'}"], cwd=ROOT, capture_output=True, text=True)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *common,
                          f"--json={tmp_path / 'two.json'}"], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr[-3000:]
    a, b = (json.loads((tmp_path / name).read_text()) for name in ("one.json", "two.json"))
    for x, y in zip(a, b):
        assert x["tokens"] == y["tokens"] and x["bytes"] == y["bytes"]
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-12)
