"""Fine-tuning on text classification: pooling, a short real run on SMS spam, the label map
through checkpoint and gpt.classify, exact resume, and the bad inputs of labelled data."""

import csv
import json
import subprocess
import sys

import pytest
import torch

import train
from gpt import GPT, GPTConfig
from gpt.checkpoint import load_checkpoint
from gpt.model import GPTClassifier, pad_sequences

from conftest import ROOT, fails_with, last_wins

SMS = ROOT / "data" / "sms_spam" / "sms-spam.csv"
TINY = ["--run.task=classify", "--model.n_layer=2", "--model.n_head=2", "--model.n_embd=32", "--model.block_size=48",
        "--model.vocab_multiple=1", "--batch.batch_size=16", "--optim.lr=3e-3", "--optim.warmup_iters=5",
        "--eval.eval_interval=20", "--log.log_interval=5", "--log.plot=false", "--classify.tokenizer=byte"]


def sms_slice(tmp_path, n=800):
    """The first n messages of the shipped SMS Spam Collection, as its own CSV."""
    with open(SMS, newline="") as f:
        rows = list(csv.reader(f))
    path = tmp_path / "sms.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows[: n + 1])
    return path


def args(train_file, out_dir, *more):
    return last_wins([f"--classify.train_file={train_file}", f"--run.out_dir={out_dir}", "--classify.label_column=spam",
                      *TINY, *more])


def evals(out_dir):
    return [r for r in map(json.loads, (out_dir / "metrics.jsonl").read_text().splitlines()) if "val_loss" in r]


def test_last_real_token_pooling_is_the_same_with_left_or_right_padding():
    torch.manual_seed(0)
    model = GPTClassifier(GPT(GPTConfig(block_size=32, vocab_size=60, n_layer=2, n_head=2, n_embd=32)), 3).eval()
    texts = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9], [42]]
    left, right = pad_sequences(texts, left=True), pad_sequences(texts, left=False)
    logits_left, logits_right = model(*left)[0], model(*right)[0]
    torch.testing.assert_close(logits_left, logits_right, rtol=1e-5, atol=1e-5)
    alone = torch.cat([model(torch.tensor([t]))[0] for t in texts])
    torch.testing.assert_close(logits_left, alone, rtol=1e-5, atol=1e-5)


def test_auxiliary_language_modelling_loss():
    torch.manual_seed(0)
    model = GPTClassifier(GPT(GPTConfig(block_size=32, vocab_size=60, n_layer=2, n_head=2, n_embd=32)), 2).eval()
    idx, mask = pad_sequences([[5, 6, 7, 8], [1, 2]], left=False)
    labels = torch.tensor([1, 0])
    _, plain = model(idx, mask, labels)
    _, with_lm = model(idx, mask, labels, lm_loss_weight=0.5)
    # the LM part: next-token cross-entropy inside each text (5->6, 6->7, 7->8 and 1->2), padding excluded
    lm_logits = model.backbone.logits(model.backbone.hidden_states(idx, attention_mask=mask))
    pairs = [(0, 0, 6), (0, 1, 7), (0, 2, 8), (1, 0, 2)]
    lm = torch.stack([torch.nn.functional.cross_entropy(lm_logits[b, t], torch.tensor(y)) for b, t, y in pairs]).mean()
    torch.testing.assert_close(with_lm, plain + 0.5 * lm, rtol=1e-5, atol=1e-6)


def test_early_stopping(tmp_path, capsys):
    data = sms_slice(tmp_path, 200)
    train.main(args(data, tmp_path / "o", "--max_iters=100", "--eval.eval_interval=5", "--eval.early_stopping=2",
                    "--optim.lr=1e-12", "--optim.min_lr=0", "--classify.best_metric=accuracy"))
    printed = capsys.readouterr().out
    assert "early stopping: no better accuracy in 2 evaluations" in printed
    assert [r["iter"] for r in evals(tmp_path / "o")] == [5, 10, 15]


def test_a_short_run_on_sms_spam_beats_the_majority_class(tmp_path):
    data = sms_slice(tmp_path)
    out = tmp_path / "run"
    train.main(args(data, out, "--max_iters=80", "--run.init_from=scratch", "--classify.tokenizer=gpt2"))
    last = evals(out)[-1]
    ham, spam = last["confusion"]
    majority = max(sum(ham), sum(spam)) / (sum(ham) + sum(spam))
    assert last["accuracy"] > majority + 0.03 and last["macro_f1"] > 0.7
    assert set(last["precision"]) == {"0", "1"} and last["val_loss"] > 0


def test_label_map_round_trips_through_checkpoint_and_gpt_classify(tmp_path):
    rows = [{"review": t, "sentiment": lab} for t, lab in [
        ("what a wonderful lovely film", "positive"), ("dreadful boring mess", "negative"),
        ("I loved every minute of it", "positive"), ("awful acting, terrible plot", "negative"),
        ("a delight, great fun", "positive"), ("worst film of the year", "negative")] * 12]
    path = tmp_path / "reviews.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    train.main(args(path, out, "--max_iters=30", "--classify.text_column=review",
                    "--classify.label_column=sentiment", "--run.init_from=scratch", "--optim.lr=1e-2"))
    ckpt = load_checkpoint(out / "best.pt")
    assert ckpt["labels"] == ["negative", "positive"] and ckpt["task"] == "classify"
    run = subprocess.run([sys.executable, "-m", "gpt.classify", f"--out_dir={out}", "wonderful lovely fun",
                          "terrible boring mess"], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    predicted = [line.split("\t")[0] for line in run.stdout.splitlines()]
    assert predicted == ["positive", "negative"]
    batch = subprocess.run([sys.executable, "-m", "gpt.classify", f"--out_dir={out}", f"--input={path}",
                            f"--output={tmp_path / 'pred.jsonl'}"], capture_output=True, text=True, cwd=ROOT)
    assert batch.returncode == 0, batch.stderr
    preds = [json.loads(line) for line in (tmp_path / "pred.jsonl").read_text().splitlines()]
    assert len(preds) == len(rows) and {p["label"] for p in preds} <= {"negative", "positive"}
    assert sum(p["label"] == r["sentiment"] for p, r in zip(preds, rows)) / len(rows) > 0.9
    # a failing run leaves an existing --output as it was, and a good one leaves no temporary file
    before = (tmp_path / "pred.jsonl").read_text()
    bad = subprocess.run([sys.executable, "-m", "gpt.classify", f"--out_dir={out}", f"--input={path}",
                          f"--output={tmp_path / 'pred.jsonl'}", "--batch_size=0"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and (tmp_path / "pred.jsonl").read_text() == before
    assert not list(tmp_path.glob(".pred.jsonl*"))
    lm_only = subprocess.run([sys.executable, "sample.py", f"--out_dir={out}"], capture_output=True, text=True, cwd=ROOT)
    assert lm_only.returncode == 2 and "is a classify checkpoint, not a language model" in lm_only.stderr


def test_a_missing_backbone_falls_back_to_scratch_only_when_asked(tmp_path, capsys):
    data = sms_slice(tmp_path, 100)
    missing = tmp_path / "no_such_run"
    train.main(args(data, tmp_path / "o", "--max_iters=2", f"--run.init_from={missing}",
                    "--classify.scratch_if_missing=true"))
    assert f"note: {missing} does not exist: training from scratch" in capsys.readouterr().out
    fails_with(capsys, args(data, tmp_path / "o2", f"--run.init_from={missing}"), f"run.init_from '{missing}' does not exist")


def test_the_shipped_config_starts_from_scratch_on_a_fresh_clone(tmp_path, capsys, monkeypatch):
    """configs/finetune_sms_spam.toml names out/shakespeare_gpt2, a relative path that looks like a
    hub id (owner/name): with scratch_if_missing it must not be looked up on the hub."""
    monkeypatch.chdir(tmp_path)  # no out/shakespeare_gpt2 here
    data = sms_slice(tmp_path, 100)
    train.main([str(ROOT / "configs" / "finetune_sms_spam.toml"), f"--classify.train_file={data}",
                "--classify.label_column=spam", "--run.out_dir=o", *TINY, "--max_iters=1"])
    assert "note: out/shakespeare_gpt2 does not exist: training from scratch" in capsys.readouterr().out


def test_exact_resume_for_classification(tmp_path):
    data = sms_slice(tmp_path, 300)
    more = ["--model.dropout=0.1", "--optim.decay_iters=24", "--eval.eval_interval=8"]
    train.main(args(data, tmp_path / "whole", "--max_iters=24", *more))
    train.main(args(data, tmp_path / "parts", "--max_iters=10", *more))
    train.main(args(data, tmp_path / "parts", "--max_iters=24", "--resume", *more))

    def losses(out):
        return {r["iter"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r}

    assert losses(tmp_path / "whole") == losses(tmp_path / "parts")
    whole, parts = load_checkpoint(tmp_path / "whole" / "ckpt.pt"), load_checkpoint(tmp_path / "parts" / "ckpt.pt")
    assert all(torch.equal(whole["model"][k], parts["model"][k]) for k in whole["model"])


def test_fine_tuning_from_our_language_model_with_a_frozen_backbone(tmp_path, char_data, capsys):
    lm = tmp_path / "lm"
    train.main([f"--data.dir={char_data}", f"--run.out_dir={lm}", "--max_iters=4", "--model.n_layer=2",
                "--model.n_head=2", "--model.n_embd=32", "--model.block_size=48", "--log.plot=false",
                "--eval.eval_iters=1", "--model.vocab_multiple=1"])
    rows = "text,label\n" + "".join(f"{t},{lab}\n" for t, lab in [("to be or not", "hamlet"), ("wherefore art thou", "romeo")] * 20)
    (tmp_path / "lines.csv").write_text(rows)
    out = tmp_path / "run"
    train.main([f"--classify.train_file={tmp_path / 'lines.csv'}", f"--run.out_dir={out}", f"--run.init_from={lm}",
                "--run.task=classify", "--classify.freeze_backbone=true", "--max_iters=3", "--log.plot=false",
                "--batch.batch_size=8"])
    printed = capsys.readouterr().out
    assert f"backbone: the language model in {lm}" in printed and "training 0.00M parameters" in printed  # head only
    ckpt, backbone = load_checkpoint(out / "ckpt.pt"), load_checkpoint(lm / "best.pt")
    assert ckpt["tokenizer"] == backbone["tokenizer"]
    assert torch.equal(ckpt["model"]["backbone.transformer.h.0.attn.c_attn.weight"],
                       backbone["model"]["transformer.h.0.attn.c_attn.weight"])  # frozen: unchanged


# ---- bad input: exit 2, one line -----------------------------------------------------------------


def write(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    return tmp_path / name


def test_label_column_missing_names_the_columns_found(tmp_path, capsys):
    data = write(tmp_path, "d.csv", "message,category\nhello,a\n")
    fails_with(capsys, args(data, tmp_path / "o"), "no column 'text' (columns found: message, category)")


def test_empty_texts_are_skipped_and_counted(tmp_path, capsys):
    data = write(tmp_path, "d.csv", "text,spam\n" + "hello there,0\n,1\n  ,0\nwin cash now,1\n" * 10)
    train.main(args(data, tmp_path / "o", "--max_iters=2", "--classify.val_fraction=0.3"))
    assert "skipped 20 row(s) with empty text" in capsys.readouterr().out


def test_validation_label_never_seen_in_training(tmp_path, capsys):
    train_file = write(tmp_path, "t.csv", "text,spam\na,0\nb,1\n")
    val_file = write(tmp_path, "v.csv", "text,spam\nc,0\nd,2\n")
    fails_with(capsys, args(train_file, tmp_path / "o", f"--classify.val_file={val_file}"),
               "the val data has label(s) never seen in training: '2'")


def test_a_single_class(tmp_path, capsys):
    data = write(tmp_path, "d.csv", "text,spam\na,0\nb,0\nc,0\n")
    fails_with(capsys, args(data, tmp_path / "o"), "has a single label ('0'): classification needs two or more")


def test_a_file_that_does_not_exist(tmp_path, capsys):
    fails_with(capsys, args(tmp_path / "nope.csv", tmp_path / "o"), "nope.csv does not exist")


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("d.csv", "text,spam\nfine,0\ntoo,many,fields,1\n", "d.csv:3: 4 fields where the header has 2"),
        ("d.jsonl", '{"text": "fine", "spam": 0}\n{"text": broken\n', "d.jsonl:2: not valid JSON"),
    ],
)
def test_malformed_lines_are_named(tmp_path, capsys, name, text, message):
    fails_with(capsys, args(write(tmp_path, name, text), tmp_path / "o"), message)


def test_backbone_whose_tokenizer_differs_from_the_settings(tmp_path, char_data, capsys):
    lm = tmp_path / "lm"
    train.main([f"--data.dir={char_data}", f"--run.out_dir={lm}", "--max_iters=2", "--model.n_layer=1",
                "--model.n_head=2", "--model.n_embd=16", "--model.block_size=16", "--log.plot=false",
                "--eval.eval_iters=1"])
    data = write(tmp_path, "d.csv", "text,spam\nhello,0\nwin,1\n" * 5)
    fails_with(capsys, [f"--classify.train_file={data}", f"--run.out_dir={tmp_path / 'o'}", "--run.task=classify",
                        f"--run.init_from={lm}", "--classify.label_column=spam", "--classify.tokenizer=gpt2"],
               "classify.tokenizer = 'gpt2', but the backbone uses the char tokenizer")
