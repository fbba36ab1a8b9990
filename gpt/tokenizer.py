"""Tokenizers: text <-> token ids behind one small interface.

    tok = get_tokenizer("gpt2")            # GPT-2's BPE through tiktoken, offline
    tok = get_tokenizer("char", text=s)    # one id per character of a corpus
    tok = get_tokenizer("byte")            # the 256 byte values
    ids = tok.encode("Hello"); tok.decode(ids) == "Hello"

Every tokenizer has an end-of-text id (`eot_token`) that separates documents,
and a `spec()`: a small JSON-able dict that rebuilds exactly the same tokenizer
with `from_spec`. Prepared data and checkpoints store the spec, so decoding never
needs the original corpus.

`encode` treats its input as plain text: a literal "<|endoftext|>" in a corpus is
just characters. The end-of-text id is inserted explicitly by whoever joins
documents; `decode` shows it as "<|endoftext|>".

Added tokens: `with_added(tok, ["mask"])` gives the same tokenizer with one more
id after its vocabulary for each name (BERT's mask; GPT-1's start, delimiter and
extract tokens). Text never encodes to them: a task inserts them by id
(`tok.added_id("mask")`), and `decode` shows them as "<|mask|>". The spec lists
them, so a checkpoint rebuilds the same ids.

The GPT-2 ranks file ships with the package (gpt/assets/gpt2.tiktoken, MIT,
OpenAI; the same file tiktoken downloads for r50k_base), is checked against its
sha256 on load, and gives exactly `tiktoken.get_encoding("gpt2")`'s ids.
"""

from __future__ import annotations

import base64
import functools
import hashlib
from importlib import resources
from pathlib import Path

import numpy as np

from gpt.errors import UserError

EOT_TEXT = "<|endoftext|>"
GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
GPT2_EOT = 50256


class Tokenizer:
    """The interface. Subclasses set name, vocab_size, eot_token and implement the rest."""

    name: str
    vocab_size: int  # ids are 0 .. vocab_size - 1, the end-of-text id included
    eot_token: int

    @property
    def text_vocab_size(self) -> int:
        """The ids text encodes to (and end-of-text): all of them but added tokens."""
        return self.vocab_size

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def encode_to_numpy(self, text: str) -> np.ndarray:
        """encode() as a uint32 array: the fast path for preparing large corpora."""
        return np.asarray(self.encode(text), dtype=np.uint32)

    def decode(self, ids) -> str:
        raise NotImplementedError

    def spec(self) -> dict:
        """A JSON-able description from which `from_spec` rebuilds this tokenizer."""
        return {"name": self.name}

    def token_bytes(self, token: int) -> bytes:
        """The UTF-8 bytes one id stands for (b"" for end-of-text, which is not text)."""
        raise NotImplementedError

    def byte_lengths(self) -> np.ndarray:
        """(vocab_size,) UTF-8 bytes of each id: the text a predicted token stands for, which
        makes losses comparable across tokenizers (bits per byte)."""
        return np.array([len(self.token_bytes(i)) for i in range(self.vocab_size)], dtype=np.int64)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, eot_token={self.eot_token})"


# ---- GPT-2 BPE -------------------------------------------------------------------

DEFAULT_GPT2_RANKS = resources.files("gpt") / "assets" / "gpt2.tiktoken"


@functools.lru_cache(maxsize=4)
def load_gpt2_encoding(ranks_path: str | Path | None = None):
    """tiktoken's GPT-2 Encoding built from a local ranks file (sha256-checked), no network."""
    import tiktoken
    from tiktoken_ext.openai_public import r50k_pat_str  # GPT-2's pre-tokenisation regex

    path = Path(str(ranks_path or DEFAULT_GPT2_RANKS))
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read the GPT-2 ranks file {path} ({e.strerror}): reinstall the package") from None
    if hashlib.sha256(data).hexdigest() != GPT2_RANKS_SHA256:
        raise UserError(f"GPT-2 ranks file {path} is corrupted (sha256 mismatch): reinstall the package")
    ranks = {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in data.splitlines() if line)}
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={EOT_TEXT: GPT2_EOT},
        explicit_n_vocab=GPT2_EOT + 1,
    )


class GPT2Tokenizer(Tokenizer):
    name = "gpt2"
    vocab_size = GPT2_EOT + 1
    eot_token = GPT2_EOT

    def __init__(self, ranks_path: str | Path | None = None):
        self.enc = load_gpt2_encoding(ranks_path)

    def encode(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str], num_threads: int = 8) -> list[list[int]]:
        return self.enc.encode_ordinary_batch(texts, num_threads=num_threads)

    def encode_to_numpy(self, text: str) -> np.ndarray:
        return self.enc.encode_to_numpy(text, disallowed_special=())  # no list of ints in between

    def decode(self, ids) -> str:
        return self.enc.decode(list(ids))

    def token_bytes(self, token: int) -> bytes:
        return b"" if token == self.eot_token else self.enc.decode_single_token_bytes(token)

    def spec(self) -> dict:
        return {"name": self.name, "ranks_sha256": GPT2_RANKS_SHA256}


# ---- characters and bytes ----------------------------------------------------------


class _SeparatedDecoder(Tokenizer):
    """decode() for tokenizers whose eot id is outside their symbol table."""

    def _decode_run(self, ids: list[int]) -> str:
        raise NotImplementedError

    def decode(self, ids) -> str:
        pieces, run = [], []
        for i in ids:
            i = int(i)
            if i == self.eot_token:
                pieces += [self._decode_run(run), EOT_TEXT]
                run = []
            else:
                run.append(i)
        pieces.append(self._decode_run(run))
        return "".join(pieces)


class CharTokenizer(_SeparatedDecoder):
    """One id per distinct character of a corpus (sorted), then the end-of-text id."""

    name = "char"

    def __init__(self, chars: str):
        if not chars:
            raise UserError("the char tokenizer needs a non-empty corpus to build its vocabulary")
        self.chars = "".join(sorted(set(chars)))
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.eot_token = len(self.chars)
        self.vocab_size = len(self.chars) + 1
        # code point -> id (-1: not in the vocabulary), for encode_to_numpy
        self.lut = np.full(ord(self.chars[-1]) + 1, -1, dtype=np.int64)
        self.lut[[ord(c) for c in self.chars]] = np.arange(len(self.chars))

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError:
            self._refuse_unknown(text)

    def encode_to_numpy(self, text: str) -> np.ndarray:
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        ids = self.lut[np.minimum(codes, len(self.lut) - 1)]
        if len(codes) and (codes.max() >= len(self.lut) or ids.min() < 0):
            self._refuse_unknown(text)
        return ids.astype(np.uint32)

    def _refuse_unknown(self, text: str):
        unknown = sorted(set(text) - set(self.stoi))
        shown = ", ".join(repr(c) for c in unknown[:10]) + (" ..." if len(unknown) > 10 else "")
        raise UserError(
            f"{len(unknown)} character(s) not in this char tokenizer's vocabulary: {shown}; "
            f"remove them or use the gpt2 or byte tokenizer"
        )

    def _decode_run(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def token_bytes(self, token: int) -> bytes:
        return b"" if token == self.eot_token else self.chars[token].encode("utf-8")

    def spec(self) -> dict:
        return {"name": self.name, "chars": self.chars}


class ByteTokenizer(_SeparatedDecoder):
    """The UTF-8 bytes of the text (ids 0-255), and 256 for end-of-text."""

    name = "byte"
    vocab_size = 257
    eot_token = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_to_numpy(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint32)

    def _decode_run(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def token_bytes(self, token: int) -> bytes:
        return b"" if token == self.eot_token else bytes([token])


# ---- added tokens ----------------------------------------------------------------


class AddedTokens(Tokenizer):
    """A tokenizer plus special ids after its vocabulary, one per name (see the module docstring)."""

    def __init__(self, base: Tokenizer, names: list[str]):
        if isinstance(base, AddedTokens):
            base, names = base.base, base.added + [n for n in names if n not in base.added]
        self.base, self.added = base, list(names)
        self.name, self.eot_token = base.name, base.eot_token
        self.vocab_size = base.vocab_size + len(self.added)

    @property
    def text_vocab_size(self) -> int:
        return self.base.vocab_size

    def added_id(self, name: str) -> int:
        return self.base.vocab_size + self.added.index(name)

    def encode(self, text: str) -> list[int]:
        return self.base.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.base.encode_batch(texts)

    def encode_to_numpy(self, text: str) -> np.ndarray:
        return self.base.encode_to_numpy(text)

    def decode(self, ids) -> str:
        pieces, run = [], []
        for i in map(int, ids):
            if i >= self.base.vocab_size:
                pieces += [self.base.decode(run), f"<|{self.added[i - self.base.vocab_size]}|>"]
                run = []
            else:
                run.append(i)
        return "".join(pieces + [self.base.decode(run)])

    def token_bytes(self, token: int) -> bytes:
        return b"" if token >= self.base.vocab_size else self.base.token_bytes(token)

    def spec(self) -> dict:
        return {**self.base.spec(), "added": self.added}


def with_added(tok: Tokenizer, names: list[str]) -> Tokenizer:
    """`tok` with the added tokens `names` (those it has already keep their ids; new ones follow)."""
    have = tok.added if isinstance(tok, AddedTokens) else []
    return tok if all(n in have for n in names) else AddedTokens(tok, names)


def base_spec(spec: dict) -> dict:
    """A tokenizer spec without its added tokens: what ids text encodes to."""
    return {k: v for k, v in spec.items() if k != "added"}


# ---- lookup ------------------------------------------------------------------------

TOKENIZERS = ("gpt2", "char", "byte")


def get_tokenizer(name: str, *, text: str | None = None) -> Tokenizer:
    """A tokenizer by name. "char" builds its vocabulary from `text` (the corpus)."""
    if name == "gpt2":
        return GPT2Tokenizer()
    if name == "byte":
        return ByteTokenizer()
    if name == "char":
        if text is None:
            raise UserError("the char tokenizer builds its vocabulary from a corpus: pass text=...")
        return CharTokenizer(text)
    raise UserError(f"unknown tokenizer {name!r}: choose one of {', '.join(TOKENIZERS)}")


def from_spec(spec: dict) -> Tokenizer:
    """Rebuild a tokenizer from `Tokenizer.spec()` (as stored in meta.json and checkpoints)."""
    if spec.get("added"):
        return AddedTokens(from_spec(base_spec(spec)), list(spec["added"]))
    name = spec.get("name")
    if name == "char":
        if "chars" not in spec:
            raise UserError("char tokenizer spec has no 'chars': the file that stored it is damaged")
        return CharTokenizer(spec["chars"])
    if name == "gpt2" and spec.get("ranks_sha256", GPT2_RANKS_SHA256) != GPT2_RANKS_SHA256:
        raise UserError("the data was tokenized with different GPT-2 ranks than this package ships")
    return get_tokenizer(name)
