"""python -m gpt.prepare: round trips on real text, determinism, the validation split,
long documents, the shipped corpus, and bad input."""

import bz2
import gzip
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from gpt import prepare as prep
from gpt.dataset import load_meta
from gpt.errors import UserError
from gpt.tokenizer import from_spec, get_tokenizer

from conftest import ROOT, SHAKESPEARE


def read_split(out, split):
    meta = load_meta(out)
    return np.fromfile(out / f"{split}.bin", dtype=meta["dtype"]), meta


def decoded_docs(out, split):
    """The documents of a split: decoded token runs that end with end-of-text."""
    tokens, meta = read_split(out, split)
    tok = from_spec(meta["tokenizer"])
    text = tok.decode(tokens.tolist())
    assert text == "" or text.endswith("<|endoftext|>")
    return text.split("<|endoftext|>")[:-1]


def write_corpus(tmp_path, docs):
    """The same documents in every input format prepare reads."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text(docs[0], newline="")
    with gzip.open(src / "sub" / "b.txt.gz", "wt", newline="") as f:
        f.write(docs[1])
    with bz2.open(src / "sub" / "c.jsonl.bz2", "wt") as f:
        for d in docs[2:]:
            f.write(json.dumps({"id": 1, "text": d}) + "\n\n")  # blank lines are skipped
    (src / ".hidden").write_text("not a document")
    return src


@pytest.mark.parametrize("tokenizer", ["gpt2", "char", "byte"])
def test_round_trip_gives_the_documents_back(tmp_path, shakespeare_docs, tokenizer):
    docs = shakespeare_docs + ["a short note\r\nwith windows line ends", "ünïcødé ✓ 🚀"]
    src = write_corpus(tmp_path, docs)
    meta = prep.prepare([str(src)], tmp_path / "out", tokenizer, val_fraction=0.4, seed=3, workers=2)
    train, val = decoded_docs(tmp_path / "out", "train"), decoded_docs(tmp_path / "out", "val")
    assert sorted(train + val) == sorted(docs)
    assert train == [d for d in docs if d in train] and val == [d for d in docs if d in val]  # order kept
    assert meta["train"]["documents"] == len(train) and meta["val"]["documents"] == len(val) >= 1
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == get_tokenizer(tokenizer, text="".join(docs)).vocab_size
    assert [i["path"].rsplit("/", 1)[-1] for i in meta["inputs"]] == ["a.txt", "b.txt.gz", "c.jsonl.bz2"]
    if tokenizer == "gpt2":  # the tokens themselves are the tokenizer's, document by document
        tok = get_tokenizer("gpt2")
        tokens, _ = read_split(tmp_path / "out", "train")
        expected = np.concatenate([tok.encode(d) + [tok.eot_token] for d in train])
        np.testing.assert_array_equal(tokens, expected)


def test_same_seed_gives_identical_bytes_whatever_the_workers(tmp_path, shakespeare_docs):
    src = write_corpus(tmp_path, shakespeare_docs * 3)
    outs = [tmp_path / f"out{i}" for i in range(3)]
    prep.prepare([str(src)], outs[0], "gpt2", val_fraction=0.3, seed=7, workers=1)
    prep.prepare([str(src)], outs[1], "gpt2", val_fraction=0.3, seed=7, workers=2)
    prep.prepare([str(src)], outs[2], "gpt2", val_fraction=0.3, seed=8, workers=2)
    for name in ("train.bin", "val.bin"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes()
    assert json.loads((outs[0] / "meta.json").read_text()) == json.loads((outs[1] / "meta.json").read_text())
    assert (outs[0] / "val.bin").read_bytes() != (outs[2] / "val.bin").read_bytes()  # the seed matters


def test_validation_split_takes_whole_documents(tmp_path):
    docs = [f"document number {i}: " + "lorem ipsum " * (i % 7 + 1) for i in range(400)]
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    meta = prep.prepare([str(src)], tmp_path / "out", "byte", val_fraction=0.1, seed=0, workers=1)
    val = decoded_docs(tmp_path / "out", "val")
    assert set(val) <= set(docs) and 20 <= len(val) <= 60  # ~10% of 400, whole documents
    assert meta["val_split"] == "documents"
    assert decoded_docs(tmp_path / "out", "train")[0] == docs[0]  # the first document always trains


def test_one_document_is_split_inside_with_a_note(tmp_path, shakespeare_docs, capsys):
    play = shakespeare_docs[3]
    (tmp_path / "play.txt").write_text(play, newline="")
    meta = prep.prepare([str(tmp_path / "play.txt")], tmp_path / "out", "char", val_fraction=0.1, workers=1)
    assert "no whole document went to validation" in capsys.readouterr().err
    train, _ = read_split(tmp_path / "out", "train")
    val, _ = read_split(tmp_path / "out", "val")
    assert meta["val_split"] == "tail" and len(val) == round(0.1 * (len(play) + 1))
    tok = from_spec(meta["tokenizer"])
    assert tok.decode(np.concatenate([train, val]).tolist()) == play + "<|endoftext|>"


def test_long_documents_are_cut_where_the_tokens_do_not_change(tmp_path, shakespeare_docs, monkeypatch):
    monkeypatch.setattr(prep, "PIECE_CHARS", 997)  # cut the play into ~100 pieces
    monkeypatch.setattr(prep, "ITEM_CHARS", 5000)
    text = shakespeare_docs[3] + "\n  odd\n\n  spacing \n\tat the\u00a0end  "
    (tmp_path / "play.txt").write_text(text, newline="")
    prep.prepare([str(tmp_path / "play.txt")], tmp_path / "out", "gpt2", val_fraction=0.0, workers=1)
    tokens, _ = read_split(tmp_path / "out", "train")
    tok = get_tokenizer("gpt2")
    assert tokens.tolist() == tok.encode(text) + [tok.eot_token]


def test_split_point_never_changes_gpt2_tokens(shakespeare_docs):
    tok = get_tokenizer("gpt2")
    text = shakespeare_docs[2][:20000]
    for end in range(500, 20000, 1500):
        cut = prep.split_point(text[:end])
        assert 0 < cut < end
        assert tok.encode(text[:cut]) + tok.encode(text[cut:]) == tok.encode(text)


def test_shipped_shakespeare_prepares_offline_for_gpt2_and_char(tmp_path):
    corpus = tmp_path / "shakespeare"
    shutil.copytree(SHAKESPEARE / "texts", corpus / "texts")
    for name in ("char", "gpt2"):
        out = prep.ensure_prepared(corpus, name)
        meta = load_meta(out)
        assert out == corpus / name and meta["train"]["documents"] + meta["val"]["documents"] == 42
        assert meta["val"]["documents"] >= 1 and meta["train"]["tokens"] > 1_000_000
        assert "ROMEO" in "".join(decoded_docs(out, "train") + decoded_docs(out, "val"))
        assert prep.ensure_prepared(corpus, name) == out  # prepared once, then reused
    assert load_meta(corpus / "char")["vocab_size"] < 100


# ---- bad input --------------------------------------------------------------------------------


def test_input_that_does_not_exist(tmp_path):
    with pytest.raises(UserError, match="input .*nope.txt does not exist"):
        prep.prepare([str(tmp_path / "nope.txt")], tmp_path / "out", "byte")
    with pytest.raises(UserError, match="no files match"):
        prep.prepare([str(tmp_path / "*.nothing")], tmp_path / "out", "byte")


@pytest.mark.parametrize("tokenizer", ["gpt2", "char"])
def test_empty_corpus(tmp_path, tokenizer):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(UserError, match="the corpus is empty"):
        prep.prepare([str(tmp_path / "empty.txt")], tmp_path / "out", tokenizer, workers=1)
    assert not (tmp_path / "out" / "train.bin").exists() and not (tmp_path / "out" / "meta.json").exists()


def test_invalid_utf8_is_replaced_counted_and_reported(tmp_path, capsys):
    (tmp_path / "bad.txt").write_bytes(b"good text \xff\xfe then more \xc3 end")
    (tmp_path / "good.txt").write_text("fine")
    meta = prep.prepare([str(tmp_path)], tmp_path / "out", "byte", val_fraction=0.0, workers=1)
    assert meta["replaced_bytes"] == 3
    assert [i["replaced_bytes"] for i in meta["inputs"]] == [3, 0]
    assert "3 bytes were not valid UTF-8" in capsys.readouterr().err
    assert decoded_docs(tmp_path / "out", "train")[0] == "good text \ufffd\ufffd then more \ufffd end"


def test_existing_dataset_needs_overwrite(tmp_path):
    (tmp_path / "a.txt").write_text("some text")
    prep.prepare([str(tmp_path / "a.txt")], tmp_path / "out", "byte", workers=1)
    with pytest.raises(UserError, match="already holds a dataset .*pass --overwrite"):
        prep.prepare([str(tmp_path / "a.txt")], tmp_path / "out", "byte", workers=1)
    (tmp_path / "a.txt").write_text("other text")
    prep.prepare([str(tmp_path / "a.txt")], tmp_path / "out", "byte", val_fraction=0.0, workers=1, overwrite=True)
    assert decoded_docs(tmp_path / "out", "train") == ["other text"]


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"text": "fine"}\n{"text": broken}\n', r"docs.jsonl:2: not valid JSON"),
        ('{"text": "fine"}\n\n{"body": "x", "id": 3}\n', r"docs.jsonl:3: no 'text' field \(found: body, id\)"),
        ('{"text": 42}\n', r"docs.jsonl:1: field 'text' is int, not text"),
    ],
)
def test_bad_jsonl_names_file_and_line_and_leaves_nothing(tmp_path, line, message):
    (tmp_path / "docs.jsonl").write_text(line)
    with pytest.raises(UserError, match=message):
        prep.prepare([str(tmp_path / "docs.jsonl")], tmp_path / "out", "byte", workers=1)
    assert not (tmp_path / "out").exists()  # no half-written or temporary file, not even the new folder


def test_damaged_compressed_file(tmp_path):
    (tmp_path / "x.txt.gz").write_bytes(b"this is not gzip data at all")
    with pytest.raises(UserError, match="cannot read .*x.txt.gz"):
        prep.prepare([str(tmp_path / "x.txt.gz")], tmp_path / "out", "byte", workers=1)


def test_cli_bad_input_exits_2_with_one_line(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "gpt.prepare", str(tmp_path / "a.txt"), f"--out={tmp_path / 'out'}", "--tokenizer=bpe"],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert run.returncode == 2
    assert run.stderr.strip() == "error: unknown tokenizer 'bpe': choose one of gpt2, char, byte"


def test_cli_prepares_with_a_summary_line(tmp_path, shakespeare_docs):
    (tmp_path / "a.txt").write_text(shakespeare_docs[0])
    (tmp_path / "b.txt").write_text(shakespeare_docs[1])
    run = subprocess.run(
        [sys.executable, "-m", "gpt.prepare", str(tmp_path / "*.txt"), f"--out={tmp_path / 'out'}",
         "--tokenizer=gpt2", "--val_fraction=0.5", "--workers=2", "--seed=1"],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(f"prepared {tmp_path / 'out'}: train ") and "tokens/s" in run.stdout
    assert load_meta(tmp_path / "out")["train"]["documents"] + load_meta(tmp_path / "out")["val"]["documents"] == 2


def test_hf_input_without_the_datasets_package(tmp_path):
    try:
        import datasets  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("datasets is installed: the hf: path would need the network")
    with pytest.raises(UserError, match=r"hf:roneneldan/TinyStories needs the datasets package: pip install 'gpt\[datasets\]'"):
        prep.prepare(["hf:roneneldan/TinyStories"], tmp_path / "out", "gpt2", workers=1)
    assert not (tmp_path / "out").exists()  # a failed hf: preparation leaves no empty folder


def test_temporary_files_of_a_killed_preparation_are_removed(tmp_path):
    """A preparation killed with SIGKILL leaves hidden .NAME.tmp-PID files; the next one removes them."""
    (tmp_path / "a.txt").write_text("some text to prepare")
    (tmp_path / "out").mkdir()
    stale = tmp_path / "out" / ".train.bin.tmp-99999"
    stale.write_bytes(b"half")
    prep.prepare([str(tmp_path / "a.txt")], tmp_path / "out", "byte", val_fraction=0.0, workers=1)
    assert not stale.exists() and (tmp_path / "out" / "meta.json").exists()
