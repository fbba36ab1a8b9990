"""GPT vs BERT vs the prefix LM (gpt/objectives.py, lm.objective): the corruption, the split
points, and each objective training end to end through train.py."""

import json

import pytest
import torch

import train
from gpt.checkpoint import load_checkpoint
from gpt.dataset import TokenDataset
from gpt.model import GPT, GPTConfig
from gpt.objectives import mask_tokens, objective_batch, prefix_split
from gpt.tokenizer import from_spec, get_tokenizer, with_added

from conftest import fails_with
from test_train import args, metrics, run_cli, step_losses, weights


def test_the_mask_token_is_an_added_id_that_text_never_encodes_to():
    char = get_tokenizer("char", text="abc")
    tok = with_added(char, ["mask"])
    assert tok.vocab_size == char.vocab_size + 1 and tok.added_id("mask") == char.vocab_size == 4
    assert tok.text_vocab_size == char.vocab_size
    assert tok.encode("ab") == [0, 1] and tok.decode([0, 4, 1, 3]) == "a<|mask|>b<|endoftext|>"
    assert from_spec(tok.spec()).spec() == tok.spec() and from_spec(tok.spec()).added_id("mask") == 4
    more = with_added(tok, ["start", "mask"])  # existing ids stay
    assert more.added_id("mask") == 4 and more.added_id("start") == 5
    gpt2 = with_added(get_tokenizer("gpt2"), ["mask"])
    assert gpt2.added_id("mask") == 50257 and gpt2.encode("<|mask|>") == get_tokenizer("gpt2").encode("<|mask|>")
    assert 50257 not in gpt2.encode("<|mask|> <|endoftext|>")  # text is text


def test_masking_chooses_15_percent_and_splits_them_80_10_10_never_padding():
    g = torch.Generator().manual_seed(0)
    B, T, V, MASK = 1000, 100, 50, 50
    tokens = torch.randint(0, V, (B, T), generator=g)
    lengths = torch.randint(20, T + 1, (B,), generator=g)
    real = torch.arange(T)[None, :] < lengths[:, None]  # right padding
    inputs, targets = mask_tokens(tokens, real, range(B), seed=3, mask_id=MASK, vocab_size=V)
    chosen = targets >= 0
    assert not (chosen & ~real).any()  # never padding
    assert (inputs[~real] == tokens[~real]).all()  # padding untouched
    assert torch.equal(chosen.sum(1), (0.15 * lengths.double()).round().long().clamp(min=1))  # 15% of each row
    assert torch.equal(targets[chosen], tokens[chosen]) and (inputs[~chosen] == tokens[~chosen]).all()
    n = chosen.sum().item()
    masked = (inputs[chosen] == MASK).sum().item() / n
    kept = (inputs[chosen] == tokens[chosen]).sum().item() / n  # includes random draws of the same token (1/V of 10%)
    swapped = 1 - masked - kept
    assert n > 5000 and abs(masked - 0.8) < 0.02 and abs(swapped - 0.1 * (1 - 1 / V)) < 0.015
    assert abs(kept - (0.1 + 0.1 / V)) < 0.015
    assert (inputs < V).logical_or(inputs == MASK).all()  # random tokens are real ids, never added ones
    again = mask_tokens(tokens, real, range(B), seed=3, mask_id=MASK, vocab_size=V)
    assert torch.equal(again[0], inputs) and torch.equal(again[1], targets)  # one key, one draw
    shifted = mask_tokens(tokens[1:], real[1:], range(1, B), seed=3, mask_id=MASK, vocab_size=V)
    assert torch.equal(shifted[0], inputs[1:]) and torch.equal(shifted[1], targets[1:])  # rows follow their keys
    row5 = mask_tokens(tokens[5:6], real[5:6], [5], seed=3, mask_id=MASK, vocab_size=V)
    assert torch.equal(row5[0][0], inputs[5]) and torch.equal(row5[1][0], targets[5])


def test_the_prefix_objective_scores_the_suffix_only():
    windows = torch.arange(2 * 9).view(2, 9)  # T = 8
    P = prefix_split(8, [0, 1], seed=0)
    x, y, prefix = objective_batch("prefix", windows, [0, 1], seed=0)
    assert torch.equal(prefix, P) and torch.equal(x, windows[:, :-1])
    for row in range(2):
        p = int(P[row])
        # position t predicts token t + 1; t < P - 1 sees that token (both in the prefix): not scored
        assert (y[row, : p - 1] == -1).all() and torch.equal(y[row, p - 1 :], windows[row, p:])
    splits = prefix_split(8, range(4000), seed=1)
    assert splits.min() == 1 and splits.max() == 7 and set(splits.tolist()) == set(range(1, 8))
    x, y, prefix = objective_batch("mlm", windows, [0, 1], seed=0, mask_id=99, vocab_size=18)
    assert prefix.tolist() == [8, 8] and ((y == -1) | (y == windows[:, :-1])).all()


def test_bidirectional_attention_lets_a_later_token_change_an_earlier_output_causal_does_not():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=30, n_layer=2, n_head=2, n_embd=32, position="rope")).eval()
    a = torch.randint(0, 30, (1, 10))
    b = a.clone()
    b[0, 9] = (a[0, 9] + 1) % 30
    for prefix, changes in ((None, False), (10, True)):
        ha, hb = model.hidden_states(a, prefix=prefix), model.hidden_states(b, prefix=prefix)
        assert torch.allclose(ha[0, :9], hb[0, :9], atol=1e-6) != changes


def test_grow_vocab_keeps_the_old_rows_and_ties_the_new_ones():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=30, n_layer=1, n_head=2, n_embd=16, vocab_multiple=32))
    old = model.transformer.wte.weight[:30].clone()
    model.grow_vocab(31)  # inside the padding
    assert model.config.vocab_size == 31 and model.transformer.wte.weight[30].abs().sum() > 0
    model.grow_vocab(40)  # past it: a new table
    w = model.transformer.wte.weight
    assert w.shape == (64, 16) and torch.equal(w[:30], old) and model.lm_head.weight is w
    assert model(torch.tensor([[39, 1]]), torch.tensor([[1, 39]]))[0].shape == (1, 2, 40)


def test_each_objective_trains_and_reports_its_own_loss(char_data, tmp_path):
    for objective in ("mlm", "prefix"):
        out = tmp_path / objective
        train.main(args(char_data, out, "--max_iters=12", f"--lm.objective={objective}"))
        evals = [r for r in metrics(out) if "val_loss" in r]
        assert evals[-1]["val_loss"] < evals[0]["val_loss"] < 4.5
        ckpt = load_checkpoint(out / "ckpt.pt")
        assert ckpt["objective"] == objective
        if objective == "mlm":
            tok = from_spec(ckpt["tokenizer"])
            assert tok.added_id("mask") == tok.vocab_size - 1 == ckpt["model_config"]["vocab_size"] - 1


@pytest.mark.parametrize("objective", ["mlm", "prefix"])
def test_resume_is_bit_exact(objective, char_data, tmp_path):
    more = [f"--lm.objective={objective}", "--model.dropout=0.1"]
    train.main(args(char_data, tmp_path / "whole", "--max_iters=10", *more))
    train.main(args(char_data, tmp_path / "parts", "--max_iters=4", *more))
    train.main(args(char_data, tmp_path / "parts", "--max_iters=10", "--resume", *more))
    assert step_losses(tmp_path / "whole") == step_losses(tmp_path / "parts")
    for name, tensor in weights(tmp_path / "whole").items():
        assert torch.equal(tensor, weights(tmp_path / "parts")[name]), name


def test_a_masked_lm_refuses_to_generate_and_evaluates_its_masked_token_loss(char_data, tmp_path, capsys):
    out = tmp_path / "mlm"
    train.main(args(char_data, out, "--max_iters=4", "--lm.objective=mlm"))
    sample = run_cli("sample.py", f"--out_dir={out}", "--max_new_tokens=5")
    assert sample.returncode == 2 and sample.stderr.count("\n") == 1
    assert "masked language model" in sample.stderr and "cannot generate left to right" in sample.stderr
    from gpt.evaluate import main as evaluate

    evaluate([f"--out_dir={out}", "--context=32", "--json", str(tmp_path / "e.json")])
    assert "masked language model" in capsys.readouterr().out
    result = json.loads((tmp_path / "e.json").read_text())[0]
    with pytest.raises(SystemExit) as e:
        evaluate([f"--out_dir={out}", "--context=32", "--stride=16"])
    assert e.value.code == 2 and "remove --stride" in capsys.readouterr().err
    tokens = len(TokenDataset(char_data, "val"))
    assert 0.14 * tokens < result["tokens"] < 0.16 * tokens and 1.0 < result["loss"] < 5.0


def test_an_unknown_objective_is_one_line(char_data, tmp_path, capsys):
    fails_with(capsys, args(char_data, tmp_path / "x", "--lm.objective=bert"), "lm.objective must be one of causal, mlm, prefix")


@pytest.mark.slow
@pytest.mark.parametrize("objective, parallel", [("mlm", "ddp"), ("prefix", "ddp"), ("mlm", "fsdp")])
def test_two_processes_equal_one_for_the_objective(char_data, tmp_path, objective, parallel):
    more = ["--max_iters=4", "--batch.tokens_per_step=256", f"--lm.objective={objective}"]
    one = run_cli("train.py", *args(char_data, tmp_path / "one", *more))
    assert one.returncode == 0, one.stderr
    two = run_cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
                  *args(char_data, tmp_path / "two", *more, f"--system.parallel={parallel}"), env={"OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, f"exit {two.returncode}\n{two.stdout[-2000:]}\n{two.stderr[-6000:]}"
    l1, l2 = step_losses(tmp_path / "one"), step_losses(tmp_path / "two")
    assert l1.keys() == l2.keys() == set(range(1, 5))
    for it in l1:
        assert l1[it] == pytest.approx(l2[it], abs=1e-5)
    from test_parallel import weights as whole_weights  # FSDP writes shards: read them back whole

    two_weights = whole_weights(tmp_path / "two")
    for name, tensor in whole_weights(tmp_path / "one").items():
        torch.testing.assert_close(tensor, two_weights[name], rtol=0, atol=1e-5)


def test_linear_attention_refuses_the_objectives_that_look_both_ways(char_data, tmp_path, capsys):
    fails_with(capsys, args(char_data, tmp_path / "x", "--lm.objective=prefix", "--model.attention=linear",
                            "--model.position=learned"), "it has no bidirectional or prefix attention")
    assert not (tmp_path / "x" / "ckpt.pt").exists()


def test_a_prefix_needs_two_tokens_per_window(char_data, tmp_path, capsys):
    fails_with(capsys, args(char_data, tmp_path / "x", "--lm.objective=prefix", "--model.block_size=1"),
               "it needs block_size >= 2")
