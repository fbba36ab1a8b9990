"""Bad inputs, table-driven: every command line a user can get wrong (train.py, sample.py,
python -m gpt.prepare, python -m gpt.classify) exits with status 2 and one line naming the
problem, leaves nothing half-written behind, and the Python API raises gpt.UserError.

Each case: (name, command, argv or a function of the fixtures giving it, words the line must hold).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import sample
import train
from gpt import checkpoint, classify, evaluate, inspect, prepare
from gpt.errors import UserError

from conftest import ROOT, last_wins

TINY = ["--model.n_layer=1", "--model.n_head=2", "--model.n_embd=16", "--model.block_size=16", "--model.vocab_multiple=1",
        "--batch.batch_size=2", "--eval.eval_interval=2", "--eval.eval_iters=1", "--log.log_interval=1",
        "--log.plot=false", "--max_iters=2"]
NOT_UTF8 = bytes([0xFF, 0xFE, 0x41])
SMS_ROWS = "text,label\n" + "".join(f"{t},{lab}\n" for t, lab in [("win a prize now", "spam"), ("see you at six", "ham")] * 10)


@pytest.fixture(scope="module")
def world(tmp_path_factory, char_data):
    """A tiny language-model run, a tiny classifier run, and their data, made once."""
    root = tmp_path_factory.mktemp("bad_inputs")
    lm = root / "lm"
    train.main([f"--data.dir={char_data}", f"--run.out_dir={lm}", *TINY])
    (root / "sms.csv").write_text(SMS_ROWS)
    clf = root / "clf"
    train.main([f"--run.out_dir={clf}", "--run.task=classify", f"--classify.train_file={root / 'sms.csv'}",
                "--classify.tokenizer=byte", "--classify.val_fraction=0.2", *TINY])
    fsdp = root / "fsdp"  # sharded checkpoints at iterations 2 and 4
    train.main(last_wins([f"--data.dir={char_data}", f"--run.out_dir={fsdp}", *TINY, "--max_iters=4",
                          "--system.parallel=fsdp"]))
    return {"root": root, "data": char_data, "lm": lm, "clf": clf, "sms": root / "sms.csv", "fsdp": fsdp}


class Case:
    def __init__(self, tmp: Path, world: dict, monkeypatch):
        self.tmp, self.w, self.env = tmp, world, monkeypatch

    def file(self, name: str, content: str | bytes) -> Path:
        path = self.tmp / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path

    def lm_copy(self) -> Path:
        """A copy of the language-model run (cases may damage it)."""
        return Path(shutil.copytree(self.w["lm"], self.tmp / "lm"))

    def data_copy(self) -> Path:
        return Path(shutil.copytree(self.w["data"], self.tmp / "data"))

    def train(self, *more) -> list[str]:
        return last_wins([f"--data.dir={self.w['data']}", f"--run.out_dir={self.tmp / 'run'}", *TINY, *more])


def _damaged_tokens(c: Case) -> list[str]:
    data = c.data_copy()
    tokens = np.memmap(data / "train.bin", dtype=np.uint16, mode="r+")
    tokens[5] = 65000  # random bytes of the right size: an id far beyond the vocabulary
    tokens.flush()
    return c.train(f"--data.dir={data}")


def _edited_vocab(c: Case) -> list[str]:
    data = c.data_copy()
    meta = json.loads((data / "meta.json").read_text())
    meta["vocab_size"] = 10  # edited by hand: the file holds larger ids
    (data / "meta.json").write_text(json.dumps(meta))
    return c.train(f"--data.dir={data}")


def _only_best(c: Case) -> list[str]:
    run = c.lm_copy()
    for path in run.glob("ckpt*.pt"):
        path.unlink()
    return ["--resume", f"--run.out_dir={run}"]


def _classify_resume_in_lm_run(c: Case) -> list[str]:
    run = c.lm_copy()
    return ["--resume", f"--run.out_dir={run}", "--run.task=classify", f"--classify.train_file={c.w['sms']}"]


TRAIN = [
    ("unknown key", lambda c: c.train("--optim.lrr=1"), "unknown config key 'optim.lrr': did you mean 'optim.lr'?"),
    ("wrong type", lambda c: c.train("--optim.lr=abc"), "optim.lr must be a number"),
    ("out of range", lambda c: c.train("--optim.lr=-1"), "optim.lr must be positive"),
    ("unknown section", lambda c: [str(c.file("c.toml", "[optimm]\nlr = 1\n"))], "unknown section [optimm]: did you mean [optim]?"),
    ("missing config file", lambda c: [str(c.tmp / "none.toml")], "none.toml does not exist"),
    ("config not UTF-8", lambda c: [str(c.file("c.toml", b"[run]\nout_dir = '" + NOT_UTF8 + b"'\n"))], "is not UTF-8 text"),
    ("config not TOML", lambda c: [str(c.file("c.toml", "[run\n"))], "is not valid TOML"),
    ("key given twice", lambda c: c.train() + ["--run.max_iters=3", "--run.max_iters=4"], "--run.max_iters is given twice"),
    ("not key=value", lambda c: [str(c.file("c.toml", "")), "max_iters"], "cannot read argument 'max_iters'"),
    ("forgotten --resume", lambda c: c.train(f"--run.out_dir={c.lm_copy()}"), "holds another run"),
    ("resume and overwrite", lambda c: c.train("--resume", "--overwrite"), "give one of them"),
    ("misspelt flag", lambda c: c.train("--resum"), "unknown flag --resum: did you mean --resume?"),
    ("resume below the run's iteration", lambda c: ["--resume", f"--run.out_dir={c.lm_copy()}", "--max_iters=1"],
     "the run is at iteration 2, beyond run.max_iters = 1"),
    ("nothing to resume", lambda c: c.train("--resume"), "nothing to resume"),
    ("resume changes lr", lambda c: ["--resume", f"--run.out_dir={c.lm_copy()}", "--optim.lr=1e-2"],
     "would change the resumed run"),
    ("resume changes model", lambda c: ["--resume", f"--run.out_dir={c.lm_copy()}", "--model.n_layer=3"],
     "--model.n_layer=3 would change the resumed run (it has 1)"),
    ("resume with only best.pt", _only_best, "has no ckpt.pt (only best.pt): copy best.pt to ckpt.pt"),
    ("classify config on an lm run", _classify_resume_in_lm_run, "holds a lm run, but run.task = 'classify'"),
    ("data not prepared", lambda c: c.train(f"--data.dir={c.tmp / 'nowhere'}"), "has no meta.json"),
    ("token ids beyond the vocabulary", _damaged_tokens, "holds token id 65,000"),
    ("meta.json vocab edited", _edited_vocab, "differs from the data's (10, char tokenizer"),
    ("out_dir is a file", lambda c: c.train(f"--run.out_dir={c.file('f', 'x')}"), "is a file: name a directory"),
    ("out_dir under a file", lambda c: c.train(f"--run.out_dir={c.file('f', 'x') / 'run'}"), "cannot be written"),
    ("batch not divisible", lambda c: c.train("--batch.tokens_per_step=1000"), "must be a multiple of"),
    ("model too large", lambda c: c.train("--model.n_embd=200000", "--model.n_head=2"),
     "B parameters: weights, gradients and AdamW state, 16 bytes each, before activations) needs about"),
    ("unknown task", lambda c: c.train("--run.task=qa"), "run.task must be one of lm, classify"),
    ("classify without data", lambda c: c.train("--run.task=classify"), "needs classify.train_file"),
    ("init_from missing", lambda c: c.train(f"--run.init_from={c.tmp / 'no_run'}"), "does not exist"),
    ("init_from a classifier", lambda c: c.train(f"--run.init_from={c.w['clf']}"),
     "is a classify checkpoint, not a language model"),
    ("vocab_size mismatch", lambda c: c.train("--model.vocab_size=50257"), "model.vocab_size = 50257, but"),
    ("heads do not divide", lambda c: c.train("--model.n_head=3"), "must be divisible by n_head"),
    ("unknown position", lambda c: c.train("--model.position=relative"),
     "model.position must be one of 'learned', 'sinusoidal', 'rope', 'alibi', 'none', got 'relative'"),
    ("unknown norm", lambda c: c.train("--model.norm=batchnorm"), "model.norm must be one of 'layernorm', 'rmsnorm'"),
    ("unknown norm_position", lambda c: c.train("--model.norm_position=sandwich"), "model.norm_position must be one of"),
    ("negative window", lambda c: c.train("--model.attention_window=-4"), "model.attention_window must be a whole number >= 0"),
    ("kv heads do not divide", lambda c: c.train("--model.n_kv_head=3", "--model.n_head=2"),
     "model.n_kv_head (3) must divide n_head (2)"),
    ("rope with an odd head dimension", lambda c: c.train("--model.position=rope", "--model.n_embd=18", "--model.n_head=2"),
     "the head dimension n_embd / n_head = 9 is odd"),
    ("block_size beyond the data", lambda c: c.train("--model.block_size=10000000"), "fewer than one window"),
    ("device not here", lambda c: c.train("--system.device=cuda:7"), "system.device 'cuda:7' is not usable here"),
    ("bad dtype", lambda c: c.train("--system.dtype=float8"), "dtype must be one of"),
    ("unknown parallel", lambda c: c.train("--system.parallel=zero3"), 'system.parallel must be "ddp" or "fsdp"'),
    ("fsdp in float16", lambda c: c.train("--system.parallel=fsdp", "--system.dtype=float16"),
     'does not train in float16'),
    ("activation checkpointing", lambda c: c.train("--system.activation_checkpointing=all"),
     'system.activation_checkpointing must be "none" or "blocks"'),
    ("labelled file of random bytes", lambda c: c.train("--run.task=classify",
                                                        f"--classify.train_file={c.file('x.csv', bytes(range(256)) * 2)}"),
     "no column 'text'"),
    ("single label", lambda c: c.train("--run.task=classify",
                                       "--classify.train_file=" + str(c.file("one.csv", "text,label\n" + "a,x\n" * 5))),
     "has a single label"),
    ("device that holds no data", lambda c: c.train("--system.device=meta"), "system.device 'meta' is not usable here"),
    ("rope_base that overflows", lambda c: c.train("--model.position=rope", "--model.rope_base=1e-300"),
     "model.rope_base must be greater than 1, got 1e-300: at or below 1 RoPE's rotation frequencies"),
    ("unknown attention", lambda c: c.train("--model.attention=performer"),
     "model.attention must be one of 'softmax', 'linear', 'synthesizer_dense', 'synthesizer_random', "
     "'synthesizer_random_fixed', 'synthesizer_random+softmax', got 'performer'"),
    ("unknown block", lambda c: c.train("--model.block=mamba"), "model.block must be one of 'transformer', 'gau'"),
    ("unknown scale", lambda c: c.train("--model.attention_scale=sqrt_n"),
     "model.attention_scale must be one of 'sqrt_d', 'one', 'logn', got 'sqrt_n'"),
    ("unknown pattern", lambda c: c.train("--model.attention_pattern=random"),
     "model.attention_pattern must be one of 'dense', 'dilated', 'strided'"),
    ("pattern stride below 1", lambda c: c.train("--model.attention_pattern=dilated", "--model.attention_stride=0"),
     "model.attention_pattern = 'dilated' needs attention_stride >= 1"),
    ("stride without a pattern", lambda c: c.train("--model.attention_stride=4"),
     "model.attention_stride = 4 applies to attention_pattern = 'dilated' or 'strided' only"),
    ("gau with another attention", lambda c: c.train("--model.block=gau", "--model.attention=linear"),
     "model.block = 'gau' brings its own attention"),
    ("gau with shared kv heads", lambda c: c.train("--model.block=gau", "--model.n_kv_head=1"),
     "block = 'gau' has none to share: leave n_kv_head at 0"),
    ("gau with alibi", lambda c: c.train("--model.block=gau", "--model.position=alibi"),
     "block = 'gau' cannot take it"),
    ("linear attention with a window", lambda c: c.train("--model.attention=linear", "--model.attention_window=4"),
     "model.attention = 'linear' keeps one running sum of all earlier tokens: it cannot take an attention_window"),
    ("synthesizer with rope", lambda c: c.train("--model.attention=synthesizer_dense", "--model.position=rope"),
     "model.position = 'rope' rotates queries and keys"),
    ("scale without scores", lambda c: c.train("--model.attention=linear", "--model.attention_scale=logn"),
     "attention = 'linear' has no such scores to scale"),
    ("init_from a learned-position run with a longer block_size",
     lambda c: c.train(f"--run.init_from={c.w['lm']}", "--model.block_size=32"),
     "model.block_size = 32 is longer than the 16 positions of the learned position embeddings, which cannot grow: "
     "use block_size <= 16"),
]


def _rope_run(c: Case) -> Path:
    """A tiny run of a RoPE model (its generation keeps every token) in c.tmp / "run"."""
    train.main(c.train("--model.position=rope"))
    return c.tmp / "run"


SAMPLE = [
    ("typo", lambda c: [f"--out_dir={c.w['lm']}", "--temprature=0.5"], "unknown option --temprature=0.5: did you mean --temperature?"),
    ("empty stop", lambda c: [f"--out_dir={c.w['lm']}", "--stop="], "--stop is empty"),
    ("missing prompt file", lambda c: [f"--out_dir={c.w['lm']}", f"--prompt_file={c.tmp / 'p.txt'}"], "No such file or directory"),
    ("prompt file is a directory", lambda c: [f"--out_dir={c.w['lm']}", f"--prompt_file={c.tmp}"], "Is a directory"),
    ("prompt file not UTF-8", lambda c: [f"--out_dir={c.w['lm']}", "--prompt_file=" + str(c.file("p.txt", NOT_UTF8))],
     "is not UTF-8 text"),
    ("top_p", lambda c: [f"--out_dir={c.w['lm']}", "--top_p=1.5"], "top_p must be in (0, 1]"),
    ("temperature", lambda c: [f"--out_dir={c.w['lm']}", "--temperature=-1"], "temperature must be >= 0"),
    ("num_samples", lambda c: [f"--out_dir={c.w['lm']}", "--num_samples=0"], "--num_samples must be at least 1"),
    ("max_new_tokens", lambda c: [f"--out_dir={c.w['lm']}", "--max_new_tokens=0"], "max_new_tokens must be at least 1"),
    ("no checkpoint", lambda c: [f"--out_dir={c.tmp / 'none'}"], "no checkpoint at"),
    ("a classifier", lambda c: [f"--out_dir={c.w['clf']}"], "is a classify checkpoint, not a language model"),
    ("damaged checkpoint", lambda c: [f"--out_dir={c.tmp}", f"--ckpt={c.file('ckpt.pt', b'not a checkpoint')}"],
     "cannot load checkpoint"),
    ("unknown hub model", lambda c: ["--init_from=gpt-17"], "unknown model 'gpt-17'"),
    ("device", lambda c: [f"--out_dir={c.w['lm']}", "--device=cuda:7"], "--device 'cuda:7' is not usable here"),
    ("top_k", lambda c: [f"--out_dir={c.w['lm']}", "--top_k=0"], "top_k must be >= 1"),
    ("bad number", lambda c: [f"--out_dir={c.w['lm']}", "--top_k=many"], "invalid int value: 'many'"),
    ("beams with top_p", lambda c: [f"--out_dir={c.w['lm']}", "--num_beams=4", "--top_p=0.9"],
     "beam search (num_beams > 1) does not sample"),
    ("early_stopping", lambda c: [f"--out_dir={c.w['lm']}", "--num_beams=2", "--early_stopping=sometimes"],
     "early_stopping must be true, false or never"),
    ("length_penalty nan", lambda c: [f"--out_dir={c.w['lm']}", "--num_beams=2", "--length_penalty=nan"],
     "length_penalty must be a finite number, got nan"),
    ("length_penalty -inf", lambda c: [f"--out_dir={c.w['lm']}", "--num_beams=2", "--length_penalty=-inf"],
     "length_penalty must be a finite number, got -inf"),
    ("device that holds no data", lambda c: [f"--out_dir={c.w['lm']}", "--device=meta"], "--device 'meta' is not usable here"),
    ("out_dir beside init_from", lambda c: [f"--out_dir={c.w['lm']}", "--init_from=gpt2"],
     "--init_from and --out_dir both name the model"),
    ("exported char model without its tokenizer", lambda c: [f"--init_from={_exported(c, tokenizer=False)}"],
     "but GPT-2's tokenizer (no gpt_tokenizer.json names another) has 50,257"),
    ("KV cache beyond free memory", lambda c: [f"--out_dir={_rope_run(c)}", "--max_new_tokens=1000000000000", "--stop=e",
                                               "--stream"],
     "generating 1,000,000,000,000 tokens (a KV cache of"),
]

PREPARE = [
    ("out is a file", lambda c: [str(c.file("a.txt", "hello")), f"--out={c.file('f', 'x')}", "--tokenizer=byte"], "is a file"),
    ("out under a file", lambda c: [str(c.file("a.txt", "hello")), f"--out={c.file('f', 'x') / 'd'}", "--tokenizer=byte"],
     "cannot be created"),
    ("missing input", lambda c: [str(c.tmp / "none.txt"), f"--out={c.tmp / 'o'}"], "does not exist"),
    ("unknown tokenizer", lambda c: [str(c.file("a.txt", "hi")), f"--out={c.tmp / 'o'}", "--tokenizer=foo"], "unknown tokenizer"),
    ("val_fraction", lambda c: [str(c.file("a.txt", "hi")), f"--out={c.tmp / 'o'}", "--val_fraction=1.5"],
     "--val_fraction must be in [0, 1)"),
    ("typo", lambda c: [str(c.file("a.txt", "hi")), f"--out={c.tmp / 'o'}", "--tokeniser=byte"],
     "unknown option --tokeniser=byte: did you mean --tokenizer?"),
    ("existing dataset", lambda c: [str(c.file("a.txt", "hi")), f"--out={c.w['data']}"], "already holds a dataset"),
    ("workers", lambda c: [str(c.file("a.txt", "hi")), f"--out={c.tmp / 'o'}", "--workers=0"], "--workers must be at least 1"),
    ("empty corpus", lambda c: [str(c.file("a.txt", "")), f"--out={c.tmp / 'o'}", "--tokenizer=char"], "no text in"),
    ("missing --out", lambda c: [str(c.file("a.txt", "hi"))], "the following arguments are required: --out"),
]

CLASSIFY = [
    ("output is a directory", lambda c: [f"--out_dir={c.w['clf']}", f"--input={c.w['sms']}", f"--output={c.tmp}"],
     "is a directory"),
    ("output parent missing", lambda c: [f"--out_dir={c.w['clf']}", f"--input={c.w['sms']}", f"--output={c.tmp / 'a' / 'p.jsonl'}"],
     "does not exist: create it"),
    ("batch_size", lambda c: [f"--out_dir={c.w['clf']}", f"--input={c.w['sms']}", "--batch_size=0"], "--batch_size must be at least 1"),
    ("missing input", lambda c: [f"--out_dir={c.w['clf']}", f"--input={c.tmp / 'missing.csv'}"], "--input: "),
    ("output without input", lambda c: [f"--out_dir={c.w['clf']}", "text", f"--output={c.tmp / 'p.jsonl'}"], "give --input too"),
    ("nothing", lambda c: [f"--out_dir={c.w['clf']}"], "nothing to classify"),
    ("empty text", lambda c: [f"--out_dir={c.w['clf']}", " "], "an empty text cannot be classified"),
    ("a language model", lambda c: [f"--out_dir={c.w['lm']}", "hello"], "is a lm checkpoint, not a fine-tuned classifier"),
    ("typo", lambda c: [f"--out_dir={c.w['clf']}", "--batchsize=3", "hi"], "did you mean --batch_size?"),
]

def _byte_data(c: Case) -> str:
    prepare.prepare([str(c.file("a.txt", "some text of ours " * 20))], c.tmp / "bytes", "byte", workers=1, progress=False)
    return str(c.tmp / "bytes")


EVALUATE = [
    ("unknown out_dir", lambda c: [f"--out_dir={c.tmp / 'none'}"], "no checkpoint at"),
    ("unknown ckpt", lambda c: [f"--out_dir={c.w['lm']}", "--ckpt=nope.pt"], "no checkpoint at"),
    ("ckpt is a directory", lambda c: [f"--out_dir={c.w['lm']}", f"--ckpt={c.w['lm']}"], "is a directory: name a checkpoint file"),
    ("a classifier", lambda c: [f"--out_dir={c.w['clf']}"], "is a classify checkpoint, not a language model"),
    ("empty text file", lambda c: [f"--out_dir={c.w['lm']}", "--text", str(c.file("e.txt", ""))], "is empty"),
    ("context 0", lambda c: [f"--out_dir={c.w['lm']}", "--context=0"], "--context=0 must be at least 1"),
    ("context beyond block_size", lambda c: [f"--out_dir={c.w['lm']}", "--context=8,17"],
     "--context=17 is longer than this model can read: its learned position embeddings cover block_size = 16 "
     "positions; use at most 16 (models with position = sinusoidal, rope, alibi or none and no Synthesizer read "
     "any length)"),
    ("not numbers", lambda c: [f"--out_dir={c.w['lm']}", "--context=8,x"], "must be comma-separated whole numbers"),
    ("another tokenizer", lambda c: [f"--out_dir={c.w['lm']}", f"--data={_byte_data(c)}"],
     "holds byte tokens (257 ids), but the model reads char tokens"),
    ("stride beyond context + 1", lambda c: [f"--out_dir={c.w['lm']}", "--context=8", "--stride=10"],
     "--stride=10 must be between 1 and context + 1 = 9"),
    ("no model", lambda c: ["--context=8"], "name the model: --out_dir=DIR"),
    ("typo", lambda c: [f"--out_dir={c.w['lm']}", "--contxt=8"], "did you mean --context?"),
    ("out_dir beside init_from: no picture in the run", lambda c: [f"--out_dir={c.w['lm']}", "--init_from=gpt2", "--plot"],
     "--init_from and --out_dir both name the model"),
    ("ckpt beside init_from", lambda c: ["--init_from=gpt2", "--ckpt=best.pt"], "--init_from and --ckpt both name the model"),
    ("data beside text", lambda c: [f"--out_dir={c.w['lm']}", "--text", str(c.file("t.txt", "ROMEO")), f"--data={c.w['data']}"],
     "--text evaluates the files given, so --data would be ignored"),
    ("split beside text", lambda c: [f"--out_dir={c.w['lm']}", "--split=train", "--text", str(c.file("t.txt", "ROMEO"))],
     "--text evaluates the files given, so --split would be ignored"),
    ("json and plot at one path", lambda c: [f"--out_dir={c.w['lm']}", f"--json={c.tmp / 'r.json'}", f"--plot={c.tmp / 'r.json'}"],
     "--json and --plot both name"),
    ("json and plot at one path, written two ways", lambda c: [f"--out_dir={c.w['lm']}", "--json=r.json",
                                                               f"--plot={_chdir(c) / 'r.json'}"], "--json and --plot both name"),
    ("stride too long for a later context", lambda c: [f"--out_dir={c.w['lm']}", "--context=16,8", "--stride=12"],
     "--stride=12 must be between 1 and context + 1 = 9 for --context=8"),
    ("Synthesizer context beyond block_size", lambda c: [f"--out_dir={_run(c, 'none', '--model.attention=synthesizer_random')}",
                                                          "--context=17"],
     "--context=17 is longer than this model can read: its Synthesizer's position weights cover block_size = 16"),
    ("ALiBi context beyond memory", lambda c: [f"--out_dir={_run(c, 'alibi')}", "--context=1000000", "--text",
                                               str(c.file("long.txt", "the " * 250_000))],
     "tokens) needs about"),
    ("exported char model without its tokenizer", lambda c: [f"--init_from={_exported(c, tokenizer=False)}",
                                                             f"--data={c.w['data']}"],
     "but GPT-2's tokenizer (no gpt_tokenizer.json names another) has 50,257"),
]

INSPECT = [
    ("layers out of range", lambda c: [f"--out_dir={c.w['lm']}", "--prompt=ROMEO", "--layers=0,5"],
     "--layers=0,5: 5 is out of range; the model has 1 layers (0 to 0)"),
    ("heads out of range", lambda c: [f"--out_dir={c.w['lm']}", "--prompt=ROMEO", "--heads=-1"], "-1 is out of range"),
    ("empty prompt", lambda c: [f"--out_dir={c.w['lm']}", "--prompt="], "--prompt is empty"),
    ("missing summary text: no picture drawn", lambda c: [f"--out_dir={c.w['lm']}", "--prompt=RO", "--summary",
                                                           f"--summary_text={c.tmp / 'none.txt'}"], "No such file"),
    ("a classifier", lambda c: [f"--out_dir={c.w['clf']}", "--prompt=hi"], "is a classify checkpoint, not a language model"),
    ("unknown out_dir", lambda c: [f"--out_dir={c.tmp / 'none'}", "--prompt=hi"], "no checkpoint at"),
    ("prompt outside the vocabulary", lambda c: [f"--out_dir={c.w['lm']}", "--prompt=🚀"], "not in this char tokenizer's"),
    ("out_dir beside init_from", lambda c: [f"--out_dir={c.w['lm']}", "--init_from=gpt2", "--prompt=hi"],
     "--init_from and --out_dir both name the model"),
    ("summary picture is a directory", lambda c: [f"--out_dir={c.w['lm']}", "--prompt=RO", "--summary",
                                                  f"--out={_mkdir(c, 'attention_summary.png').parent / 'a.png'}"],
     "attention_summary.png is a directory"),
    ("summary picture is --out", lambda c: [f"--out_dir={c.w['lm']}", "--prompt=RO", "--summary",
                                            f"--out={c.tmp / 'attention_summary.png'}"], "--out and --summary (beside --out) both name"),
    ("RoPE prompt beyond memory", lambda c: [f"--out_dir={_run(c, 'rope')}", "--prompt=" + "the " * 250_000],
     "give a shorter --prompt"),
    ("exported char model without its tokenizer", lambda c: [f"--init_from={_exported(c, tokenizer=False)}", "--prompt=RO"],
     "but GPT-2's tokenizer (no gpt_tokenizer.json names another) has 50,257"),
]

def _damaged_shards(c: Case, how: str) -> Path:
    """A copy of the sharded run whose latest checkpoint (iteration 4) has damaged shards."""
    run = Path(shutil.copytree(c.w["fsdp"], c.tmp / "fsdp"))
    shards = run / "ckpt-0000004.shards"
    if how == "truncated":
        piece = shards / "__0_0.distcp"
        piece.write_bytes(piece.read_bytes()[: piece.stat().st_size // 2])
    elif how == "deleted":
        (shards / "__0_0.distcp").unlink()
    else:  # the index
        (shards / ".metadata").write_bytes((shards / ".metadata").read_bytes()[:10])
    return run


INTACT = "use ckpt-0000002.pt instead (to resume from it, copy it to ckpt.pt)"
DAMAGED = [  # every reader of a sharded checkpoint checks it first, and names the intact one
    ("sample.py", "a truncated shard", lambda c: [f"--out_dir={_damaged_shards(c, 'truncated')}"],
     "ckpt.pt is damaged: its shard directory ckpt-0000004.shards holds a truncated __0_0.distcp ("),
    ("gpt.evaluate", "a deleted shard", lambda c: [f"--out_dir={_damaged_shards(c, 'deleted')}", "--ckpt=ckpt.pt"],
     f"ckpt.pt is damaged: its shard directory ckpt-0000004.shards lacks __0_0.distcp: {INTACT}"),
    ("train.py", "resume from a damaged index", lambda c: ["--resume", f"--run.out_dir={_damaged_shards(c, 'index')}"],
     f"has a damaged index (.metadata): {INTACT}"),
    ("train.py", "init_from damaged shards", lambda c: c.train(f"--run.init_from={_damaged_shards(c, 'deleted') / 'ckpt.pt'}"),
     "ckpt.pt is damaged: its shard directory ckpt-0000004.shards lacks __0_0.distcp"),
    ("gpt.inspect", "a truncated shard", lambda c: [f"--out_dir={_damaged_shards(c, 'truncated')}", "--ckpt=ckpt.pt",
                                                    "--prompt=RO"], "holds a truncated __0_0.distcp"),
    ("gpt.checkpoint", "consolidate a damaged index",
     lambda c: ["consolidate", str(_damaged_shards(c, "index") / "ckpt.pt")], "has a damaged index (.metadata)"),
]

CHECKPOINT = [
    ("consolidate whole tensors", lambda c: ["consolidate", str(c.w["lm"] / "ckpt.pt")], "holds whole tensors already"),
    ("consolidate --out in a missing directory", lambda c: ["consolidate", str(c.w["fsdp"] / "ckpt.pt"),
                                                             f"--out={c.tmp / 'missing' / 'dir' / 'c.pt'}"],
     "dir/c.pt: its directory"),
    ("consolidate --out is a directory", lambda c: ["consolidate", str(c.w["fsdp"] / "ckpt.pt"), f"--out={c.tmp}"],
     "is a directory: name a file"),
    ("consolidate a missing file", lambda c: ["consolidate", str(c.tmp / "none.pt")], "no checkpoint at"),
]

COMMANDS = {"train.py": train.main, "sample.py": sample.main, "gpt.prepare": prepare.main, "gpt.classify": classify.main,
            "gpt.evaluate": evaluate.main, "gpt.inspect": inspect.main, "gpt.checkpoint": checkpoint.main}
CASES = {"train.py": TRAIN, "sample.py": SAMPLE, "gpt.prepare": PREPARE, "gpt.classify": CLASSIFY,
         "gpt.evaluate": EVALUATE, "gpt.inspect": INSPECT, "gpt.checkpoint": CHECKPOINT}
CASES = {command: cases + [case for where, *case in DAMAGED if where == command] for command, cases in CASES.items()}
TABLE = [(command, *case) for command, cases in CASES.items() for case in cases]


@pytest.mark.parametrize("command, name, argv, words", TABLE, ids=[f"{t[0]}: {t[1]}" for t in TABLE])
def test_a_bad_command_line_exits_2_with_one_line(world, tmp_path, capsys, monkeypatch, command, name, argv, words):
    argv = argv(Case(tmp_path, world, monkeypatch))
    capsys.readouterr()
    shared = [path for run in ("lm", "clf", "fsdp") for path in world[run].rglob("*")]
    before = {p: p.stat().st_mtime_ns for p in shared}
    with pytest.raises(SystemExit) as e:
        COMMANDS[command](argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2, err
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and len(err) < 400, err
    assert words in err, err
    assert {p: p.stat().st_mtime_ns for run in ("lm", "clf", "fsdp") for p in world[run].rglob("*")} == before
    # the shared runs are untouched, nothing was added to them either (gpt.inspect draws into
    # --out_dir only after every check)
    assert not list(tmp_path.rglob(".*.tmp-*"))  # no temporary file left behind
    if command == "train.py":  # a run that fails to start leaves no directory behind (c.train's out_dir)
        assert not (tmp_path / "run").exists()


def test_wandb_without_a_login_is_one_line_and_removes_nothing(world, tmp_path):
    """In a fresh process: wandb keeps global state, which must not leak into other tests."""
    pytest.importorskip("wandb")
    run = Case(tmp_path, world, None).lm_copy()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    result = subprocess.run([sys.executable, "train.py", *TINY, f"--data.dir={world['data']}", f"--run.out_dir={run}",
                             "--overwrite", "--log.wandb=true"], cwd=ROOT, capture_output=True, text=True,
                            env={**env, "HOME": str(tmp_path)}, timeout=300)  # no ~/.netrc: not logged in
    assert result.returncode == 2 and result.stderr.startswith("error: wandb could not start"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert (run / "ckpt.pt").exists() and (run / "best.pt").exists()  # the old run is still there


def test_the_table_is_large():
    assert len(TABLE) + len(API) >= 60


# ---- the Python API: gpt.UserError with the same one-line messages ---------------------------------------

def _api_generate():
    from gpt import GPT, GPTConfig
    from gpt.sampling import generate

    generate(GPT(GPTConfig(block_size=8, vocab_size=10, n_layer=1, n_head=1, n_embd=8)), torch.tensor([[1]]), 2, top_p=1.5)


def _api_newer_checkpoint(tmp):
    torch.save({"format_version": 99}, tmp / "new.pt")
    from gpt.checkpoint import load_checkpoint

    load_checkpoint(tmp / "new.pt")


def _api_foreign_checkpoint(tmp):
    torch.save({"weights": torch.zeros(2)}, tmp / "other.pt")
    from gpt.checkpoint import load_checkpoint

    load_checkpoint(tmp / "other.pt")


def _api_disk_full(tmp, monkeypatch):
    """torch's zip writer reports a full disk as a RuntimeError; the previous checkpoint stays."""
    from gpt import checkpoint

    checkpoint.save_checkpoint({"iter": 1, "model": {"w": torch.zeros(2)}}, tmp, keep_last=2, is_best=True)

    def full(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")

    monkeypatch.setattr(checkpoint.torch, "save", full)
    try:
        checkpoint.save_checkpoint({"iter": 2, "model": {"w": torch.ones(2)}}, tmp, keep_last=2, is_best=True)
    finally:
        monkeypatch.undo()
        assert checkpoint.load_checkpoint(tmp / "ckpt.pt")["iter"] == 1 and not list(tmp.glob(".*tmp*"))


API = [
    ("GPTConfig", lambda tmp, mp: __import__("gpt").GPTConfig(n_embd=32, n_head=5), "must be divisible by n_head"),
    ("generate", lambda tmp, mp: _api_generate(), "top_p must be in (0, 1]"),
    ("from_pretrained", lambda tmp, mp: __import__("gpt.hf").hf.from_pretrained("gpt-17"), "unknown model 'gpt-17'"),
    ("newer checkpoint", lambda tmp, mp: _api_newer_checkpoint(tmp), "newer than this code's 2: upgrade"),
    ("foreign checkpoint", lambda tmp, mp: _api_foreign_checkpoint(tmp), "is not a checkpoint of ours"),
    ("TokenDataset", lambda tmp, mp: __import__("gpt.dataset").dataset.TokenDataset(tmp), "has no meta.json"),
    ("tokenizer", lambda tmp, mp: __import__("gpt.tokenizer").tokenizer.get_tokenizer("foo"), "unknown tokenizer 'foo'"),
    ("disk full while checkpointing", lambda tmp, mp: _api_disk_full(tmp, mp),
     "cannot write a checkpoint in"),
    ("SamplingConfig length_penalty nan", lambda tmp, mp: __import__("gpt.sampling").sampling.SamplingConfig(
        num_beams=2, length_penalty=float("nan")), "length_penalty must be a finite number, got nan"),
    ("GPTConfig rope_base", lambda tmp, mp: __import__("gpt").GPTConfig(position="rope", rope_base=1e-300),
     "rope_base must be greater than 1, got 1e-300"),
    ("set_block_size beyond learned positions", lambda tmp, mp: __import__("gpt").GPT(__import__("gpt").GPTConfig(
        block_size=8, vocab_size=10, n_layer=1, n_head=1, n_embd=8)).set_block_size(16),
     "block_size = 16 is longer than the 8 positions of the learned position embeddings, which cannot grow"),
]


@pytest.mark.parametrize("name, call, words", API, ids=[a[0] for a in API])
def test_the_python_api_raises_user_error(tmp_path, monkeypatch, name, call, words):
    with pytest.raises(UserError) as e:
        call(tmp_path, monkeypatch)
    assert words in str(e.value) and "\n" not in str(e.value), str(e.value)


# ---- helpers of the cases above (called when a case runs) ------------------------------------------------

def _chdir(c: Case) -> Path:
    """Work in the case's directory (undone after the test), so that a relative path points there."""
    c.env.chdir(c.tmp)
    return c.tmp


def _mkdir(c: Case, name: str) -> Path:
    (c.tmp / name).mkdir()
    return c.tmp / name


def _run(c: Case, position: str, *more: str) -> Path:
    """A tiny language-model run with another position scheme (those read past block_size)."""
    out = c.tmp / position
    train.main(c.train(f"--run.out_dir={out}", f"--model.position={position}", *more))
    return out


def _exported(c: Case, tokenizer: bool) -> Path:
    """The shared char model exported to the Hugging Face format, with or without its tokenizer."""
    from gpt.checkpoint import load_model
    from gpt.hf import save_pretrained

    model, tok, _ = load_model(c.w["lm"] / "best.pt")
    save_pretrained(model, c.tmp / "hf", tok if tokenizer else None)
    return c.tmp / "hf"


def test_an_exported_char_model_reads_back_with_its_tokenizer(world, tmp_path, monkeypatch, capsys):
    """save_pretrained with the tokenizer: --init_from=DIR gives the loss, the text and the pictures
    of --out_dir=RUN (the char tokenizer, not GPT-2's)."""
    hf = _exported(Case(tmp_path, world, monkeypatch), tokenizer=True)
    assert json.loads((hf / "gpt_tokenizer.json").read_text())["name"] == "char"
    for model, name in ([f"--out_dir={world['lm']}"], "ours"), ([f"--init_from={hf}", f"--data={world['data']}"], "hf"):
        evaluate.main([*model, f"--json={tmp_path / name}.json"])
    ours, theirs = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("ours", "hf"))
    assert theirs[0]["tokens"] == ours[0]["tokens"] and theirs[0]["loss"] == pytest.approx(ours[0]["loss"], rel=1e-5)
    greedy = ["--prompt=ROMEO", "--temperature=0", "--max_new_tokens=20", "--no-stream"]
    capsys.readouterr()
    sample.main([f"--out_dir={world['lm']}", "--ckpt=best.pt", *greedy])
    ours = capsys.readouterr().out
    sample.main([f"--init_from={hf}", *greedy])
    assert capsys.readouterr().out == ours and ours.startswith("ROMEO") and len(ours) > len("ROMEO") + 10
    inspect.main([f"--init_from={hf}", "--prompt=ROMEO", f"--out={tmp_path / 'a.png'}"])
    assert (tmp_path / "a.png").stat().st_size > 0
