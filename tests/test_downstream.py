"""Zero- and few-shot evaluation (gpt/downstream.py, python -m gpt.evaluate --choices / --cloze): the
log-likelihoods against transformers' GPT-2 on the same weights, the three accuracies, the few-shot
prompt byte for byte, cloze against greedy decoding, the download path on local files, torchrun, and
bad options."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import gpt.downstream as ds
import train
from gpt.evaluate import main as evaluate
from gpt.tokenizer import get_tokenizer

from conftest import ROOT, last_wins

NEXT_LINE = ROOT / "data" / "shakespeare" / "tasks" / "next_line_val.jsonl"


@pytest.fixture(scope="module")
def gpt2_pair(tmp_path_factory):
    """A random transformers GPT-2 over byte tokens and the same weights as our GPT."""
    transformers = pytest.importorskip("transformers")
    from gpt.hf import from_pretrained

    path = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_positions=512, n_embd=32, n_layer=2, n_head=2,
                                                              vocab_size=257)).eval()
    hf.save_pretrained(path)
    return hf, from_pretrained(path).eval()


def hf_total(hf, prompt, cont):
    """transformers' log-likelihood of cont after prompt, each sequence alone, in float64."""
    with torch.no_grad():
        logp = F.log_softmax(hf(torch.tensor([prompt + cont])).logits[0].double(), -1)
    return sum(logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(cont))


def test_choice_logprobs_equal_transformers_gpt2_on_the_same_weights(gpt2_pair):
    """Each ending's log-likelihood after its context (sum, and token count for the per-token mean),
    from one right-padded batch, equals transformers' GPT-2 scoring each sequence alone."""
    hf, ours = gpt2_pair
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        context = torch.randint(0, 257, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist()
        endings = [torch.randint(0, 257, (n,), generator=g).tolist() for n in (1, 5, 9, 3)]
        scored = ds.continuation_scores(ours, [(context, e) for e in endings])
        for (total, count, _), ending in zip(scored, endings, strict=True):
            expected = hf_total(hf, context, ending)
            assert count == len(ending)
            assert total == pytest.approx(expected, abs=1e-4)
            assert total / count == pytest.approx(expected / len(ending), abs=1e-4)  # the per-token mean
    with pytest.raises(ds.UserError, match="the context needs at least one token"):
        ds.continuation_scores(ours, [([], [1])])


@pytest.mark.parametrize("shots", [0, 2])
def test_the_three_accuracies_equal_transformers_scores_of_the_shipped_questions(gpt2_pair, shots):
    hf, ours = gpt2_pair
    tok = get_tokenizer("byte")
    questions = ds.read_choices(NEXT_LINE, "--choices")[:12]
    pool = ds.read_choices(NEXT_LINE.with_name("next_line_train.jsonl"), "--shots_from")
    right = {"acc": 0, "acc_norm": 0, "acc_char": 0}
    for i, (context, endings, label) in enumerate(questions):
        pairs, chars = ds.question_rows(tok, questions, i, pool, shots, seed=7, limit=512)
        assert chars == [len(e) for e in endings]  # the context ends with a line break: no separator
        assert [c for _, c in pairs] == [list(e.encode()) for e in endings]  # byte ids
        totals = [hf_total(hf, prompt, cont) for prompt, cont in pairs]
        for metric, score in (("acc", totals), ("acc_norm", [t / len(c) for t, (_, c) in zip(totals, pairs)]),
                              ("acc_char", [t / n for t, n in zip(totals, chars)])):
            right[metric] += max(range(len(score)), key=score.__getitem__) == label
    result = ds.evaluate_choices(ours, tok, questions, "q", shots=shots, shot_pool=pool, seed=7, batch_size=8)
    assert result["questions"] == 12 and result["shots"] == shots
    for metric, n in right.items():
        assert result[metric] == n / 12, metric


def test_the_few_shot_prompt_is_the_documented_format_byte_for_byte():
    assert ds.few_shot_prompt("Q3 is", [("Q1\n", "a1"), ("Q2 is", "a2")]) == "Q1\na1\n\nQ2 is a2\n\nQ3 is"
    tok = get_tokenizer("byte")
    questions = [("Now:\n", ["x", "y"], 0), ("Then", ["p", "q"], 1)]
    pool = [("S1\n", ["no", "yes"], 1), ("S2", ["right", "wrong"], 0), ("S3\n", ["a", "b"], 0)]
    pairs, _ = ds.question_rows(tok, questions, 1, pool, shots=2, seed=0)
    drawn = __import__("random").Random(0 * 1_000_003 + 1).sample(range(3), 2)
    shots = "".join({0: "S1\nyes", 1: "S2 right", 2: "S3\na"}[j] + "\n\n" for j in drawn)
    assert bytes(pairs[0][0]).decode() == shots + "Then" and [bytes(c).decode() for _, c in pairs] == [" p", " q"]
    # a prompt too long for the model loses its beginning; the endings stay whole
    pairs, _ = ds.question_rows(tok, questions, 1, pool, shots=2, seed=0, limit=6)
    assert bytes(pairs[0][0]).decode() == "Then"[-4:] and len(pairs[0][0]) + 2 == 6


def test_cloze_accuracy_is_greedy_decoding_of_the_last_word(gpt2_pair, tmp_path):
    hf, ours = gpt2_pair
    tok = get_tokenizer("byte")
    texts = [("The cat sat on the", " mat"), ("To be or not to", " be"), ("a", " b")]
    result = ds.evaluate_cloze(ours, tok, texts, "t")
    greedy, total = 0, 0.0
    for context, word in texts:
        ids, target = tok.encode(context), tok.encode(word)
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=len(target), do_sample=False, pad_token_id=0)
        greedy += out[0, len(ids):].tolist() == target
        total += hf_total(hf, ids, target)
    assert result["texts"] == 3 and result["acc"] == greedy / 3
    assert result["perplexity"] == pytest.approx(float(torch.tensor(-total / 3).exp()), rel=1e-4)
    # a last word that is the model's own greedy continuation is right
    for prompt in ("hello", "abc", "the", "xyz", "To be", "q", "1 2 3", "Zz"):
        ids = tok.encode(prompt)
        with torch.no_grad():
            own = hf.generate(torch.tensor([ids]), max_new_tokens=1, do_sample=False, pad_token_id=0)[0, -1].item()
        if own < 128:  # ASCII: one byte, one character
            break
    assert own < 128
    assert ds.evaluate_cloze(ours, tok, [(prompt, chr(own))], "t")["acc"] == 1.0
    assert ds.evaluate_cloze(ours, tok, [(prompt, chr((own + 1) % 128))], "t")["acc"] == 0.0
    path = tmp_path / "lambada.jsonl"
    path.write_text('{"text": "one two three"}\n{"text": "solo"}\n')
    with pytest.raises(ds.UserError, match=":2: the text needs a context and a last word"):
        ds.read_cloze(path, "--cloze")
    path.write_text('{"text": "one two three"}\n')
    assert ds.read_cloze(path, "--cloze") == [("one two", " three")]


# ---- the command line --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quick_lm(tmp_path_factory, char_data):
    out = tmp_path_factory.mktemp("lm") / "run"
    train.main(last_wins([f"--data.dir={char_data}", f"--run.out_dir={out}", "--model.n_layer=1", "--model.n_head=2",
                          "--model.n_embd=32", "--model.block_size=64", "--model.position=rope",
                          "--model.vocab_multiple=1", "--batch.batch_size=4", "--run.max_iters=3",
                          "--log.plot=false", "--eval.eval_iters=1"]))
    return out


def covered(char_data, tmp_path, source, n):
    """The first n questions of a shipped file that the small char vocabulary can encode."""
    chars = set(json.loads((char_data / "meta.json").read_text())["tokenizer"]["chars"])
    rows = [line for line in source.read_text().splitlines()
            if set(json.loads(line)["ctx"] + "".join(json.loads(line)["endings"])) <= chars][:n]
    path = tmp_path / source.name
    path.write_text("\n".join(rows) + "\n")
    return path


def test_the_command_scores_choices_few_shot_and_writes_json(quick_lm, char_data, tmp_path, capsys):
    questions = covered(char_data, tmp_path, NEXT_LINE, 20)
    shots = covered(char_data, tmp_path, NEXT_LINE.with_name("next_line_train.jsonl"), 20)
    evaluate([f"--out_dir={quick_lm}", f"--choices={questions}", "--shots=2", f"--shots_from={shots}",
              f"--json={tmp_path / 'r.json'}"])
    printed = capsys.readouterr().out
    assert "20 questions, 2-shot: acc " in printed and "acc_norm" in printed and "acc_char" in printed
    result = json.loads((tmp_path / "r.json").read_text())[0]
    assert result["questions"] == 20 and 0 <= result["acc"] <= 1 and result["shots"] == 2


def test_a_known_set_is_downloaded_once_into_the_cache(quick_lm, char_data, tmp_path, capsys, monkeypatch):
    source = covered(char_data, tmp_path, NEXT_LINE, 8)
    monkeypatch.setitem(ds.DATASETS, "hellaswag", (source.as_uri(), "hellaswag_val.jsonl"))
    monkeypatch.setattr(ds, "CACHE", tmp_path / "cache")
    evaluate([f"--out_dir={quick_lm}", "--choices=hellaswag", "--limit=5"])
    captured = capsys.readouterr()
    assert "downloading hellaswag" in captured.err and "hellaswag: 5 questions, 0-shot" in captured.out
    assert (tmp_path / "cache" / "hellaswag_val.jsonl").read_bytes() == source.read_bytes()
    evaluate([f"--out_dir={quick_lm}", "--choices=hellaswag", "--limit=5"])
    assert "downloading" not in capsys.readouterr().err  # the second time from the cache
    monkeypatch.setitem(ds.DATASETS, "lambada", ((tmp_path / "missing.jsonl").as_uri(), "lambada.jsonl"))
    with pytest.raises(SystemExit) as e:
        evaluate([f"--out_dir={quick_lm}", "--cloze=lambada"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[-1].startswith("error: --cloze=lambada: cannot download")
    assert not (tmp_path / "cache" / "lambada.jsonl").exists()


@pytest.mark.parametrize("argv, message", [
    (["--shots=2"], "--shots: for few-shot multiple choice; give --choices=FILE"),
    (["--cloze=Q", "--seed=3"], "--seed: for few-shot multiple choice"),
    (["--limit=0", "--choices=Q"], "--limit must be at least 1"),
    (["--choices=Q", "--shots=2"], "--shots=2 needs --shots_from=FILE"),
    (["--choices=Q", "--shots_from=Q", "--shots=1"], "--shots_from is the file being evaluated"),
    (["--choices=Q", "--context=32"], "--context (for the loss) would be ignored"),
    (["--choices=Q", "--shots=-1"], "--shots must be 0 or more"),
    (["--choices=Q", "--shots=50", "--shots_from=S"], "--shots=50, but --shots_from holds 3 question(s)"),
    (["--choices=BAD"], ":2: 2 answers where the rows before have 3"),
])
def test_bad_downstream_options_are_one_line(quick_lm, tmp_path, capsys, argv, message):
    q = tmp_path / "q.jsonl"
    q.write_text("".join(json.dumps({"ctx": "a b", "endings": ["a", "b", "c"], "label": 0}) + "\n" for _ in range(3)))
    (tmp_path / "bad.jsonl").write_text(q.read_text().splitlines()[0] + "\n"
                                        + json.dumps({"ctx": "a", "endings": ["a", "b"], "label": 0}) + "\n")
    argv = [a.replace("=Q", f"={q}").replace("=S", f"={q.with_name('s.jsonl')}").replace("=BAD", f"={tmp_path / 'bad.jsonl'}")
            for a in argv]
    q.with_name("s.jsonl").write_text(q.read_text())
    with pytest.raises(SystemExit) as e:
        evaluate([f"--out_dir={quick_lm}", *argv])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert message in err, err


def test_a_masked_lm_is_not_scored_left_to_right(char_data, tmp_path, capsys):
    out = tmp_path / "mlm"
    train.main(last_wins([f"--data.dir={char_data}", f"--run.out_dir={out}", "--lm.objective=mlm", "--model.n_layer=1",
                          "--model.n_head=2", "--model.n_embd=32", "--model.block_size=32", "--run.max_iters=1",
                          "--log.plot=false", "--eval.eval_iters=1", "--batch.batch_size=2"]))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        evaluate([f"--out_dir={out}", f"--choices={NEXT_LINE}"])
    assert e.value.code == 2 and "downstream tasks are scored left to right" in capsys.readouterr().err


@pytest.mark.slow
def test_two_processes_score_like_one(quick_lm, char_data, tmp_path):
    questions = covered(char_data, tmp_path, NEXT_LINE, 15)
    common = ["-m", "gpt.evaluate", f"--out_dir={quick_lm}", f"--choices={questions}", "--batch_size=6"]
    one = subprocess.run([sys.executable, *common, f"--json={tmp_path / 'one.json'}"], cwd=ROOT, capture_output=True,
                         text=True)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *common,
                          f"--json={tmp_path / 'two.json'}"], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr[-3000:]
    a, b = (json.loads((tmp_path / name).read_text())[0] for name in ("one.json", "two.json"))
    assert a == b and a["questions"] == 15
