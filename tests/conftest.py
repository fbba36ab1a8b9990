"""Shared test data: real text from the shipped Shakespeare corpus."""

import lzma
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT / "data" / "shakespeare"
SMALL_WORKS = ["phoenix_and_the_turtle", "passionate_pilgrim", "lovers_complaint", "comedy_of_errors"]


@pytest.fixture(scope="session")
def shakespeare_docs() -> list[str]:
    """Four real documents (two short poems, a longer poem, a play), ~110 kB of text."""
    return [lzma.open(SHAKESPEARE / "texts" / f"{name}_gut.txt.xz", "rt", newline="").read() for name in SMALL_WORKS]


@pytest.fixture(scope="session")
def char_data(tmp_path_factory, shakespeare_docs):
    """Those four works prepared with the char tokenizer (a directory for TokenDataset / train.py)."""
    from gpt.prepare import prepare

    root = tmp_path_factory.mktemp("data")
    for i, doc in enumerate(shakespeare_docs):
        (root / f"{i}.txt").write_text(doc)
    prepare([str(root / "*.txt")], root / "char", "char", val_fraction=0.3, seed=1, workers=1, progress=False)
    return root / "char"


def fails_with(capsys, argv, message):
    """train.py's main(argv) exits 2 with one 'error: ...' line that contains message."""
    import train

    with pytest.raises(SystemExit) as e:
        train.main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert message in err, err


def last_wins(argv: list[str]) -> list[str]:
    """Test helpers put defaults first and a test's own settings after; train.py refuses a key
    given twice, so keep only the last --key=value of each key."""
    keys = [a.split("=", 1)[0] for a in argv]
    return [a for i, a in enumerate(argv) if not a.startswith("--") or "=" not in a or keys[i] not in keys[i + 1:]]
