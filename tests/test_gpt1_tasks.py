"""GPT-1's input transformations (gpt/tasks/gpt1.py): the sequences against hand-built token ids,
each task training end to end on the shipped Shakespeare task files, predictions, exact resume,
2 processes = 1, and the bad inputs of their data."""

import json
import math
import subprocess
import sys

import pytest
import torch

import train
from gpt.checkpoint import load_checkpoint
from gpt.classify import main as classify
from gpt.model import GPT, GPTClassifier, GPTConfig
from gpt.tasks.gpt1 import Entailment, EntailmentConfig, MultipleChoice, MultipleChoiceConfig, Similarity, SimilarityConfig, framed
from gpt.tokenizer import get_tokenizer, with_added

from conftest import ROOT, fails_with, last_wins
from test_train import run_cli

TASKS = ROOT / "data" / "shakespeare" / "tasks"
FILES = {"multiple_choice": "next_line", "entailment": "follows", "similarity": "same_speech"}
TINY = ["--model.n_layer=2", "--model.n_head=2", "--model.n_embd=32", "--model.block_size=96", "--model.vocab_multiple=1",
        "--batch.batch_size=8", "--optim.lr=3e-3", "--optim.warmup_iters=3", "--eval.eval_interval=10",
        "--log.log_interval=1", "--log.plot=false", "--run.seed=3"]


def head(task, split, n, tmp_path):
    """The first n items of a shipped task file, as a file of their own."""
    lines = (TASKS / f"{FILES[task]}_{split}.jsonl").read_text().splitlines()[:n]
    path = tmp_path / f"{task}_{split}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def args(task, tmp_path, out, *more, n=64):
    return last_wins([f"--run.task={task}", f"--{task}.train_file={head(task, 'train', n, tmp_path)}",
                      f"--{task}.val_file={head(task, 'val', 16, tmp_path)}", f"--{task}.tokenizer=byte",
                      f"--run.out_dir={out}", *TINY, *more])


SCORES = ["--similarity.target=score", "--similarity.label_column=closeness"]  # similarity as a regression
VARIANTS = [("multiple_choice", []), ("entailment", []), ("similarity", []), ("similarity", SCORES)]
VARIANT_IDS = ["multiple_choice", "entailment", "similarity", "similarity_score"]


def losses(out):
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def evaluations(out):
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "val_loss" in r]


# ---- the sequences ----------------------------------------------------------------------------------


def test_the_transformations_are_the_hand_built_sequences():
    char = get_tokenizer("char", text="abcdefgh ")
    tok = with_added(char, ["start", "delimiter", "extract"])
    s, d, e = char.vocab_size, char.vocab_size + 1, char.vocab_size + 2
    ab = char.encode("ab")
    cde = char.encode("cde")
    assert framed(tok, "ab", "cde", 64, "head") == [s, *ab, d, *cde, e]
    assert Entailment.encode(("ab", "cde"), tok, 64, EntailmentConfig()) == [[s, *ab, d, *cde, e]]
    settings = SimilarityConfig()
    assert Similarity.encode(("ab", "cde"), tok, 64, settings) == [[s, *ab, d, *cde, e], [s, *cde, d, *ab, e]]
    mc = MultipleChoiceConfig()
    assert MultipleChoice.encode(("ab ", ["c", "de", "fgh"]), tok, 64, mc) == [
        [s, *char.encode("ab "), d, *char.encode(ans), e] for ans in ("c", "de", "fgh")]
    # too long: the first text keeps its `truncate` end, the second its head (at least half the room)
    long_a, long_b = "abcdefgh" * 2, "hgfedcba" * 2
    ids = framed(tok, long_a, long_b, 11, "tail")  # room 8: b keeps 4, a keeps its last 4
    assert ids == [s, *char.encode("efgh"), d, *char.encode("hgfe"), e]
    assert framed(tok, long_a, "ab", 11, "head") == [s, *char.encode("abcdef"), d, *ab, e]


def test_similarity_adds_the_states_of_both_orders_and_choice_scores_each_answer():
    torch.manual_seed(0)
    backbone = GPT(GPTConfig(block_size=16, vocab_size=20, n_layer=1, n_head=2, n_embd=16)).eval()
    pair = torch.tensor([[[1, 2, 3, 4], [3, 4, 1, 2]]])  # (1 example, 2 orders, 4 tokens)
    sim = GPTClassifier(backbone, 3, dropout=0.0, combine="sum").eval()
    h = backbone.hidden_states(pair[0])[:, -1]  # last token of each order
    torch.testing.assert_close(sim(pair)[0], sim.head(h.sum(0, keepdim=True)))
    mc = GPTClassifier(backbone, 1, dropout=0.0, combine="choice").eval()
    answers = torch.tensor([[[1, 2, 3, 0], [1, 2, 5, 6], [1, 7, 7, 7]]])
    mask = torch.tensor([[[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1]]])
    scores = mc(answers, mask)[0]
    alone = [mc.head(backbone.hidden_states(answers[0, i : i + 1, : int(mask[0, i].sum())])[:, -1])[0, 0] for i in range(3)]
    assert scores.shape == (1, 3)
    torch.testing.assert_close(scores[0], torch.stack(alone), rtol=1e-5, atol=1e-5)


# ---- training ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["multiple_choice", "entailment", "similarity"])
def test_each_task_trains_and_predicts(task, tmp_path, capsys):
    out = tmp_path / "run"
    train.main(args(task, tmp_path, out, "--run.max_iters=60", n=16))  # 16 items, seen 30 times each
    printed = capsys.readouterr().out
    loss = losses(out)
    assert sum(loss[-5:]) / 5 < sum(loss[:5]) / 5  # it learns its training items
    ckpt = load_checkpoint(out / "ckpt.pt")
    assert ckpt["task"] == task and ckpt["combine"] == ("choice" if task == "multiple_choice" else "sum")
    assert ckpt["tokenizer"]["added"] == ["start", "delimiter", "extract"]
    assert ckpt["model_config"]["vocab_size"] == 257 + 3
    if task == "multiple_choice":
        assert ckpt["labels"] == ["0", "1", "2", "3"] and "questions per step" in printed
    predictions = tmp_path / "p.jsonl"
    classify([f"--out_dir={out}", f"--input={head(task, 'test', 10, tmp_path)}", f"--output={predictions}"])
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert len(rows) == 10 and all(abs(sum(r["probabilities"].values()) - 1) < 1e-5 for r in rows)
    assert all(r["label"] in ckpt["labels"] for r in rows)
    source = [json.loads(line) for line in head(task, "test", 10, tmp_path).read_text().splitlines()]
    first_field = next(iter(rows[0]))
    assert [r[first_field] for r in rows] == [s[first_field] for s in source]


@pytest.mark.parametrize("task, variant", VARIANTS, ids=VARIANT_IDS)
def test_resume_is_bit_exact(task, variant, tmp_path):
    more = ["--model.dropout=0.1", "--optim.decay_iters=12", *variant]  # the same schedule in both
    train.main(args(task, tmp_path, tmp_path / "whole", "--run.max_iters=12", *more))
    train.main(args(task, tmp_path, tmp_path / "parts", "--run.max_iters=5", *more))
    train.main(args(task, tmp_path, tmp_path / "parts", "--run.max_iters=12", "--resume", *more))
    assert losses(tmp_path / "whole") == losses(tmp_path / "parts")
    whole, parts = (load_checkpoint(tmp_path / run / "ckpt.pt")["model"] for run in ("whole", "parts"))
    assert all(torch.equal(whole[k], parts[k]) for k in whole)


def test_fine_tuning_a_masked_lm_reads_both_ways(tmp_path, char_data):
    lm = tmp_path / "mlm"
    train.main(last_wins([f"--data.dir={char_data}", f"--run.out_dir={lm}", "--lm.objective=mlm", "--run.max_iters=2",
                          *TINY]))
    # the shipped files hold characters the small corpus lacks: keep the items the char vocabulary covers
    chars = set(json.loads((char_data / "meta.json").read_text())["tokenizer"]["chars"])
    items = [line for line in (TASKS / "follows_train.jsonl").read_text().splitlines()
             if set(json.loads(line)["premise"] + json.loads(line)["hypothesis"]) <= chars][:40]
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(items) + "\n")
    out = tmp_path / "ft"
    train.main(last_wins(["--run.task=entailment", f"--entailment.train_file={data}", f"--run.init_from={lm}",
                          f"--run.out_dir={out}", "--run.max_iters=2", *TINY]))
    ckpt = load_checkpoint(out / "ckpt.pt")
    assert ckpt["objective"] == "mlm"
    assert ckpt["tokenizer"]["added"] == ["mask", "start", "delimiter", "extract"]
    from gpt.checkpoint import load_model

    model, _, _ = load_model(out / "ckpt.pt", task="entailment")
    assert model.bidirectional and model.combine == "sum"


@pytest.mark.slow
@pytest.mark.parametrize("task, variant", VARIANTS, ids=VARIANT_IDS)
def test_two_processes_equal_one(task, variant, tmp_path):
    more = ["--run.max_iters=4", "--batch.batch_size=4", f"--{task}.head_dropout=0", *variant]  # no per-process dropout
    one = run_cli("train.py", *args(task, tmp_path, tmp_path / "one", *more, "--batch.grad_accum=2"))
    assert one.returncode == 0, one.stderr
    two = run_cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
                  *args(task, tmp_path, tmp_path / "two", *more), env={"OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, f"exit {two.returncode}\n{two.stdout[-2000:]}\n{two.stderr[-6000:]}"
    l1, l2 = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(l1) == len(l2) == 4 and l1 == pytest.approx(l2, abs=1e-5)
    e1, e2 = (evaluations(tmp_path / run)[-1] for run in ("one", "two"))  # each process scored half the rows
    assert e1.keys() == e2.keys()
    for k in e1.keys() - {"time", "elapsed"}:
        assert e1[k] == (pytest.approx(e2[k], abs=1e-5) if isinstance(e1[k], (float, dict)) else e2[k]), k
    w1, w2 = (load_checkpoint(tmp_path / run / "ckpt.pt")["model"] for run in ("one", "two"))
    # Parameters the loss cannot see have a gradient of zero up to rounding, which Adam turns into steps of
    # any sign: for multiple choice the final norm's bias shifts every answer's score alike (the softmax
    # cancels it; 1.7e-4 apart after 4 steps); the key bias shifts every score of a query alike (1.2e-5)
    unseen = {"backbone.transformer.ln_f.bias"} if task == "multiple_choice" else set()
    for name in w1.keys() - unseen:
        torch.testing.assert_close(w1[name], w2[name], rtol=0, atol=5e-5)


def test_similarity_of_scores_is_a_regression_scored_by_pearson_and_spearman(tmp_path, capsys):
    out = tmp_path / "run"
    train.main(args("similarity", tmp_path, out, "--run.max_iters=60", *SCORES, n=16))
    printed = capsys.readouterr().out
    assert "scores 0 to 1" in printed and "best pearson" in printed
    loss = losses(out)
    assert sum(loss[-5:]) / 5 < sum(loss[:5]) / 5
    ckpt = load_checkpoint(out / "ckpt.pt")
    assert ckpt["labels"] == ["score"] and ckpt["model"]["head.weight"].shape[0] == 1
    # the last evaluation against one computed here from gpt.classify's predictions of the same checkpoint
    last = evaluations(out)[-1]
    assert last["iter"] == ckpt["iter"] == 60
    predictions = tmp_path / "p.jsonl"
    classify([f"--out_dir={out}", "--ckpt=ckpt.pt", f"--input={head('similarity', 'val', 16, tmp_path)}",
              f"--output={predictions}"])
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    predicted = [r["score"] for r in rows]
    true = [r["closeness"] for r in map(json.loads, head("similarity", "val", 16, tmp_path).read_text().splitlines())]
    assert "label" not in rows[0] and len(set(true)) > 2

    def mean_ranks(xs):  # ties share the mean of the places they take
        return [sum(y < x for y in xs) + (sum(y == x for y in xs) - 1) / 2 for x in xs]

    def pearson(a, b):
        a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
        return float(torch.corrcoef(torch.stack([a, b]))[0, 1])

    assert last["val_loss"] == pytest.approx(sum((p - t) ** 2 for p, t in zip(predicted, true)) / 16, abs=1e-5)
    assert last["pearson"] == pytest.approx(pearson(predicted, true), abs=1e-5)
    assert last["spearman"] == pytest.approx(pearson(mean_ranks(predicted), mean_ranks(true)), abs=1e-5)


def test_a_diverged_regression_is_never_the_best_checkpoint():
    from gpt.tasks.classify import pearson
    from gpt.trainer import TrainState

    nan_predictions, true = torch.tensor([float("nan"), 1.0, 2.0]), torch.tensor([1.0, 2.0, 3.0])
    assert math.isnan(pearson(nan_predictions, true)) and pearson(torch.ones(3), true) == 0.0
    state = TrainState(best_metric="pearson")
    assert not state.improves(math.nan, True) and state.best is None
    assert state.improves(-0.2, True) and not state.improves(math.nan, True) and state.improves(0.1, True)
    assert state.best == 0.1


@pytest.mark.parametrize("more, message", [
    (["--similarity.target=score"], "similarity_train.jsonl:1: the label 'different' is not a number"),
    ([*SCORES, "--similarity.best_metric=accuracy"],
     "similarity.best_metric must be one of val_loss, pearson, spearman with target = 'score', got 'accuracy'"),
    (["--similarity.best_metric=spearman"],
     "similarity.best_metric must be one of val_loss, accuracy, macro_f1 with target = 'label', got 'spearman'"),
    (["--similarity.target=number"], 'target must be "label" or "score"'),
])
def test_bad_score_settings_are_one_line(tmp_path, capsys, more, message):
    fails_with(capsys, args("similarity", tmp_path, tmp_path / "o", *more), message)


@pytest.mark.parametrize("scores, message", [
    ([0.5, 0.5, 0.5], "every training score is 0.5: a regression needs different values"),
    ([0.5, 1e39, 0.1], ":2: the label '1e+39' is not a number"),  # past float32
    ([0.5, "nan", 0.1], ":2: the label 'nan' is not a number"),
])
def test_bad_scores_are_one_line(tmp_path, capsys, scores, message):
    rows = [{"text_a": f"line {i}", "text_b": "other", "label": score} for i, score in enumerate(scores)]
    path = write(tmp_path, "scores.jsonl", rows)
    fails_with(capsys, args("similarity", tmp_path, tmp_path / "o", "--similarity.target=score",
                            f"--similarity.train_file={path}", f"--similarity.val_file={path}"), message)


def test_predictions_into_a_closed_pipe_stop_quietly(tmp_path):
    """As `python -m gpt.classify ... | head` when head has read enough: exit 141 (SIGPIPE's), nothing printed."""
    out = tmp_path / "run"
    train.main(args("similarity", tmp_path, out, "--run.max_iters=1", *SCORES))
    proc = subprocess.Popen([sys.executable, "-m", "gpt.classify", f"--out_dir={out}", "--ckpt=ckpt.pt",
                             f"--input={TASKS / 'same_speech_test.jsonl'}"], cwd=ROOT,  # 552 lines, past a buffer
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader leaves before the first line
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 141 and err == b"", err


def test_multiple_choice_has_no_scores(tmp_path, capsys):
    fails_with(capsys, args("multiple_choice", tmp_path, tmp_path / "o", "--multiple_choice.target=score"),
               "multiple_choice.target must be \"label\" (the right answer's index)")


# ---- bad input ----------------------------------------------------------------------------------------


def write(tmp_path, name, rows):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


Q = {"ctx": "A line\n", "endings": ["one", "two", "three"], "label": 1}


@pytest.mark.parametrize("rows, message", [
    ([Q, {**Q, "endings": ["one", "two"]}], ":2: 2 answers where the rows before have 3"),
    ([Q, {**Q, "label": 3}], ":2: label '3' is not the index of one of its 3 answers (0 to 2)"),
    ([Q, {**Q, "endings": ["one", " ", "x"]}], ":2: answer 1 is empty"),
    ([Q, {"ctx": "x", "label": 0}], ":2: no answers: a list in column 'endings' or columns endings0"),
    ([Q, {"endings": ["a", "b", "c"], "label": 0}], ":2: no column 'ctx'"),
    ([Q, {**Q, "endings": ["a"]}], ":2: 1 answer(s): a question needs two or more"),
])
def test_bad_multiple_choice_rows_are_one_line(tmp_path, capsys, rows, message):
    path = write(tmp_path, "q.jsonl", rows * 3)
    fails_with(capsys, args("multiple_choice", tmp_path, tmp_path / "o", f"--multiple_choice.train_file={path}"), message)


def test_multiple_choice_from_numbered_csv_columns_and_empty_contexts_skipped(tmp_path, capsys):
    path = tmp_path / "q.csv"
    rows = ["ctx,endings0,endings1,label"] + [f"ctx {i},yes {i},no {i},{i % 2}" for i in range(20)] + [",a,b,0"]
    path.write_text("\n".join(rows) + "\n")
    train.main(args("multiple_choice", tmp_path, tmp_path / "o", f"--multiple_choice.train_file={path}",
                    "--multiple_choice.val_file=", "--run.max_iters=1"))
    printed = capsys.readouterr().out
    assert "skipped 1 row(s) with empty text" in printed and "(0 9, 1 9)" in printed


def test_validation_answers_must_match_training(tmp_path, capsys):
    train_file = write(tmp_path, "t.jsonl", [Q] * 6)
    val_file = write(tmp_path, "v.jsonl", [{**Q, "endings": ["a", "b"], "label": 0}] * 2)
    fails_with(capsys, args("multiple_choice", tmp_path, tmp_path / "o", f"--multiple_choice.train_file={train_file}",
                            f"--multiple_choice.val_file={val_file}"), "the val data has 2 answers per question")


@pytest.mark.parametrize("rows, message", [
    ([{"premise": "a", "label": "x"}], "no column 'hypothesis'"),
    ([{"premise": "a", "hypothesis": "b"}], "no column 'label'"),
    ([{"premise": "a", "hypothesis": "b", "label": " "}], "the label is empty"),
    ([{"premise": "", "hypothesis": "b", "label": "x"}], "holds no rows with both texts"),
])
def test_bad_entailment_rows_are_one_line(tmp_path, capsys, rows, message):
    path = write(tmp_path, "p.jsonl", rows)
    fails_with(capsys, args("entailment", tmp_path, tmp_path / "o", f"--entailment.train_file={path}"), message)


def test_unknown_labels_in_validation_and_texts_for_a_pair_model(tmp_path, capsys):
    train_file = write(tmp_path, "t.jsonl", [{"text_a": "a b", "text_b": "c", "label": lab} for lab in "xyxyxy"])
    val_file = write(tmp_path, "v.jsonl", [{"text_a": "a", "text_b": "c", "label": "z"}])
    fails_with(capsys, args("similarity", tmp_path, tmp_path / "o", f"--similarity.train_file={train_file}",
                            f"--similarity.val_file={val_file}"), "never seen in training: 'z'")
    out = tmp_path / "ok"
    train.main(args("similarity", tmp_path, out, f"--similarity.train_file={train_file}", "--similarity.val_file=",
                    "--similarity.val_fraction=0.34", "--run.max_iters=1"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        classify([f"--out_dir={out}", "some text"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "is a similarity model: its examples are not single texts" in err


def test_a_frozen_backbone_would_freeze_the_added_tokens(tmp_path, capsys):
    fails_with(capsys, args("entailment", tmp_path, tmp_path / "o", "--entailment.freeze_backbone=true"),
               "entailment.freeze_backbone would also freeze the new embeddings of the tokens this task adds")
