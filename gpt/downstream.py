"""Zero- and few-shot evaluation, as GPT-2 and GPT-3 measure a model without fine-tuning it.

    python -m gpt.evaluate --out_dir=out/shakespeare_char --choices=data/shakespeare/tasks/next_line_test.jsonl
    python -m gpt.evaluate --out_dir=out/shakespeare_char --choices=data/shakespeare/tasks/next_line_test.jsonl \\
        --shots=3 --shots_from=data/shakespeare/tasks/next_line_train.jsonl
    python -m gpt.evaluate --init_from=gpt2 --choices=hellaswag      # HellaSwag's validation set (downloaded once)
    python -m gpt.evaluate --init_from=gpt2 --cloze=lambada          # LAMBADA (OpenAI's test set, downloaded once)

**Multiple choice** (a JSON Lines file in HellaSwag's layout: "ctx", "endings", "label",
the right ending's index): every ending is scored by the log-probability the model gives
its tokens after the prompt, and the highest score is the model's answer:

    acc        the total log-probability of the ending's tokens
    acc_norm   per token (their mean): llm.c and build-nanogpt's acc_norm, which gives
               GPT-2 124M 0.296 on HellaSwag (acc 0.286)
    acc_char   per character of the ending: lm-evaluation-harness's acc_norm

An ending follows its context directly when the context ends with white space (a line
break), else after one space. Prompt and ending are tokenized separately (as build-nanogpt
does), so no token straddles the boundary.

**Few-shot**: --shots=k puts k other questions with their right endings before each one,
drawn from --shots_from (another split: never the question itself) by a generator seeded
with (--seed, the question's index), so the prompts do not depend on the number of
processes. The prompt is, byte for byte (SEP as above):

    {ctx_1}{SEP}{right ending_1}\\n\\n{ctx_2}{SEP}{right ending_2}\\n\\n ... {ctx_k}{SEP}{right ending_k}\\n\\n{ctx}

A prompt longer than the model reads (with the longest ending after it) loses its beginning.

**Cloze** (JSON Lines with a "text", LAMBADA's layout): the last word (after the last space)
is right when greedy decoding would produce it exactly, i.e. each of its tokens is the
model's top choice after the ones before it; also the perplexity exp(-mean log p(word)) of
lm-evaluation-harness's lambada.

Questions are scored in batches of right-padded (prompt + ending) rows; under torchrun each
process scores every world_size-th question and the counts are added.
"""

from __future__ import annotations

import math
import random
import sys
import urllib.request
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from gpt.atomic import atomic_path
from gpt.errors import UserError
from gpt.model import GPT, pad_sequences
from gpt.system import Processes, all_reduce_sum, autocast, barrier
from gpt.tasks.classify import read_rows, require_columns
from gpt.tasks.gpt1 import MultipleChoice, MultipleChoiceConfig
from gpt.tokenizer import Tokenizer

# Known sets, downloaded once into CACHE: (URL, file name)
DATASETS = {
    "hellaswag": ("https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl",
                  "hellaswag_val.jsonl"),
    "lambada": ("https://openaipublic.blob.core.windows.net/gpt-2/data/lambada_test.jsonl", "lambada_test.jsonl"),
}
CACHE = Path.home() / ".cache" / "gpt" / "datasets"


def dataset_file(name_or_path: str, option: str, procs: Processes | None = None) -> Path:
    """A file to evaluate: a path as given, or a known set's name, downloaded into CACHE on first use
    (by one process per machine under torchrun; the others wait for it)."""
    if name_or_path not in DATASETS or Path(name_or_path).exists():
        return Path(name_or_path)
    procs = procs or Processes()
    url, file_name = DATASETS[name_or_path]
    path = CACHE / file_name
    if not path.exists() and procs.local_rank == 0:
        print(f"downloading {name_or_path} from {url} ...", file=sys.stderr)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with urllib.request.urlopen(url, timeout=60) as response, atomic_path(path) as tmp:
                tmp.write_bytes(response.read())
        except OSError as e:
            raise UserError(f"{option}={name_or_path}: cannot download {url} into {path.parent} ({e}): download it "
                            f"where there is a network and give its path") from None
    barrier()
    if not path.exists():
        raise UserError(f"{option}={name_or_path}: the first process could not download it (its error is above)")
    return path


# ---- scoring -------------------------------------------------------------------------------------------


@torch.no_grad()
def continuation_scores(model: GPT, pairs: list[tuple[list[int], list[int]]], device=None,
                        dtype: torch.dtype = torch.float32) -> list[tuple[float, int, bool]]:
    """For each (prompt, continuation) of token ids: the total log-probability (nats) of the
    continuation's tokens after the prompt and its earlier tokens, their number, and whether
    each was the model's top choice (greedy decoding would produce it). One right-padded batch;
    a prompt plus its continuation must fit the model (max_context)."""
    if any(not prompt for prompt, _ in pairs):
        raise UserError("the context needs at least one token: the first token of a text has no prediction")
    if any(not cont for _, cont in pairs):
        raise UserError("every candidate ending needs at least one token")
    device = torch.device(device or "cpu")
    idx, mask = pad_sequences([p + c for p, c in pairs], left=False, device=device)
    with autocast(device, dtype):
        logits = model.logits(model.hidden_states(idx[:, :-1], attention_mask=mask[:, :-1])).float()
    logp = F.log_softmax(logits, dim=-1)
    chosen = logp.gather(-1, idx[:, 1:, None])[..., 0]  # (B, T - 1): log p(token t + 1)
    top = logits.argmax(-1) == idx[:, 1:]
    results = []
    for row, (prompt, cont) in enumerate(pairs):
        span = slice(len(prompt) - 1, len(prompt) - 1 + len(cont))  # predictions of the continuation's tokens
        results.append((chosen[row, span].sum().item(), len(cont), bool(top[row, span].all())))
    return results


def separator(context: str) -> str:
    """What goes between a context and its ending: nothing after white space, else a space."""
    return "" if not context or context[-1].isspace() else " "


def few_shot_prompt(context: str, shots: list[tuple[str, str]]) -> str:
    """The prompt of a question after k solved ones (context, right ending): see the module docstring."""
    return "".join(f"{c}{separator(c)}{ending}\n\n" for c, ending in shots) + context


def fit(prompt: list[int], longest: int, limit: int | None, where: str) -> list[int]:
    """The prompt's last tokens, so that it and the longest continuation fit `limit` tokens."""
    if limit is None or len(prompt) + longest <= limit:
        return prompt
    if longest >= limit:
        raise UserError(f"{where}: an ending of {longest} tokens leaves no room for its context in the {limit} "
                        f"tokens this model reads")
    return prompt[len(prompt) - (limit - longest):]


# ---- multiple choice ------------------------------------------------------------------------------------


def read_choices(path: str | Path, option: str) -> list[tuple[str, list[str], int]]:
    """(context, endings, right index) of each question of a HellaSwag-layout file."""
    examples, labels, skipped = MultipleChoice.read(path, MultipleChoiceConfig(), option)
    if skipped:
        print(f"note: {path}: skipped {skipped} question(s) with an empty context", file=sys.stderr)
    return [(ctx, endings, int(label)) for (ctx, endings), label in zip(examples, labels)]


def question_rows(tok: Tokenizer, questions, i: int, shot_pool=(), shots: int = 0, seed: int = 0,
                  limit: int | None = None, name: str = "") -> tuple[list[tuple[list[int], list[int]]], list[int]]:
    """Question i as (prompt ids, ending ids) pairs, one per ending, and each ending's characters
    (what acc_char divides by): the few-shot prompt of its k drawn shots, cut to fit `limit`."""
    context, endings, _ = questions[i]
    drawn = random.Random(seed * 1_000_003 + i).sample(range(len(shot_pool)), shots) if shots else []
    prompt = few_shot_prompt(context, [(shot_pool[j][0], shot_pool[j][1][shot_pool[j][2]]) for j in drawn])
    texts = [separator(context) + e for e in endings]
    conts = [tok.encode(t) for t in texts]
    ids = fit(tok.encode(prompt), max(map(len, conts)), limit, f"{name} question {i + 1}")
    return [(ids, c) for c in conts], [len(t) for t in texts]


def evaluate_choices(model: GPT, tok: Tokenizer, questions, name: str, *, shots: int = 0, shot_pool=(), seed: int = 0,
                     batch_size: int = 32, device=None, dtype=torch.float32, procs: Processes | None = None,
                     progress: bool | None = None) -> dict:
    """acc, acc_norm and acc_char of multiple-choice questions (see the module docstring)."""
    procs, device = procs or Processes(), torch.device(device or "cpu")
    if shots and len(shot_pool) < shots:
        raise UserError(f"--shots={shots}, but --shots_from holds {len(shot_pool)} question(s)")
    mine = list(range(procs.rank, len(questions), procs.world_size))
    counts = torch.zeros(4, dtype=torch.float64, device=device)  # questions, right by sum, per token, per char
    limit = model.max_context()
    model.eval()
    shown = procs.is_main and progress is not False
    per_batch = max(1, batch_size // len(questions[0][1]))  # questions per batch of about batch_size rows
    for start in tqdm(range(0, len(mine), per_batch), desc=name, unit="batch", leave=False,
                      disable=None if shown and progress is None else not shown, file=sys.stderr):
        group = mine[start : start + per_batch]
        rows = [question_rows(tok, questions, i, shot_pool, shots, seed, limit, name) for i in group]
        scores = continuation_scores(model, [pair for pairs, _ in rows for pair in pairs], device, dtype)
        for i, (pairs, chars) in zip(group, rows):
            these, scores = scores[: len(pairs)], scores[len(pairs) :]
            right = questions[i][2]
            total = [t for t, _, _ in these]
            per_token = [t / n for t, n, _ in these]
            per_char = [t / c for t, c in zip(total, chars)]
            counts += torch.tensor([1.0, *(float(max(range(len(s)), key=s.__getitem__) == right)
                                           for s in (total, per_token, per_char))], dtype=torch.float64, device=device)
    all_reduce_sum(counts)
    n, by_sum, by_token, by_char = counts.tolist()
    return {"set": name, "kind": "choices", "questions": int(n), "shots": shots, "acc": by_sum / n,
            "acc_norm": by_token / n, "acc_char": by_char / n}


# ---- cloze ---------------------------------------------------------------------------------------------------


def read_cloze(path: str | Path, option: str) -> list[tuple[str, str]]:
    """(context, " last word") of each text of a LAMBADA-layout file."""
    found = []
    for where, row in read_rows(path, option):
        require_columns(where, row, ["text"])
        text = str(row["text"] or "").rstrip()
        if " " not in text.strip():
            raise UserError(f"{where}: the text needs a context and a last word after a space")
        context, word = text.rsplit(" ", 1)
        found.append((context, " " + word))
    if not found:
        raise UserError(f"{path} holds no texts")
    return found


def evaluate_cloze(model: GPT, tok: Tokenizer, texts, name: str, *, batch_size: int = 32, device=None,
                   dtype=torch.float32, procs: Processes | None = None, progress: bool | None = None) -> dict:
    """Last-word accuracy (greedy) and the perplexity of the last words."""
    procs, device = procs or Processes(), torch.device(device or "cpu")
    mine = list(range(procs.rank, len(texts), procs.world_size))
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # texts, right, summed log-probability
    limit = model.max_context()
    model.eval()
    shown = procs.is_main and progress is not False
    for start in tqdm(range(0, len(mine), batch_size), desc=name, unit="batch", leave=False,
                      disable=None if shown and progress is None else not shown, file=sys.stderr):
        pairs = []
        for i in mine[start : start + batch_size]:
            context, word = texts[i]
            cont = tok.encode(word)
            pairs.append((fit(tok.encode(context), len(cont), limit, f"{name} text {i + 1}"), cont))
        for total, _, greedy in continuation_scores(model, pairs, device, dtype):
            sums += torch.tensor([1.0, float(greedy), total], dtype=torch.float64, device=device)
    all_reduce_sum(sums)
    n, right, total = sums.tolist()
    return {"set": name, "kind": "cloze", "texts": int(n), "acc": right / n, "perplexity": math.exp(-total / n)}


def print_downstream(results: list[dict]) -> None:
    for r in results:
        if r["kind"] == "choices":
            print(f"{r['set']}: {r['questions']} questions, {r['shots']}-shot: acc {r['acc']:.4f}, "
                  f"acc_norm {r['acc_norm']:.4f} (per token), acc_char {r['acc_char']:.4f} (per character)")
        else:
            print(f"{r['set']}: {r['texts']} texts: last-word accuracy {r['acc']:.4f}, "
                  f"perplexity {r['perplexity']:.2f}")
