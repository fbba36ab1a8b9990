"""Predict with a fine-tuned model: python -m gpt.classify.

    python -m gpt.classify --out_dir=out/sms_spam "WINNER!! Claim your prize now" "see you at 6"
    python -m gpt.classify --out_dir=out/sms_spam --input=messages.csv --output=predictions.jsonl
    python -m gpt.classify --out_dir=out/next_line --input=questions.jsonl     # multiple choice, entailment, ...

The model comes from a run of a fine-tuning task: classification (gpt/tasks/classify.py)
or one of GPT-1's input transformations (gpt/tasks/gpt1.py: entailment, similarity,
multiple_choice); its best.pt by default. Each example gets the label (for multiple
choice: the answer's index) with the highest probability; --input files (CSV, TSV or
JSON Lines, with the columns of the task's training file, labels not needed) give one
JSON line per example with every label's probability. A model of scores (target =
"score", e.g. a similarity regression) gives each example its predicted score instead.
Texts as arguments are for classification, whose examples are single texts.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import torch

from gpt.checkpoint import FINE_TUNED, checkpoint_path, load_model
from gpt.atomic import atomic_path, check_writable
from gpt.errors import ArgumentParser, UserError, exit_on_user_error
from gpt.model import GPTClassifier
from gpt.system import pick_device, to_device
from gpt.tasks import TASKS
from gpt.tasks.classify import ClassificationData
from gpt.tokenizer import Tokenizer


# ---- prediction ------------------------------------------------------------------------------------


def task_of(ckpt: dict):
    """(the task class, its settings) a fine-tuned checkpoint was trained with."""
    task = TASKS[ckpt["task"]]
    known = {f.name for f in dataclasses.fields(task.Settings)}  # a setting since removed is dropped
    return task, task.Settings(**{k: v for k, v in ckpt[ckpt["task"]].items() if k in known})


def is_regression(ckpt: dict) -> bool:
    """Whether a fine-tuned checkpoint predicts a score (target = "score"), not a label."""
    return task_of(ckpt)[1].target == "score"


@torch.no_grad()
def predict(model: GPTClassifier, tok: Tokenizer, ckpt: dict, examples: list, device, batch_size: int = 64) -> list[dict]:
    """For each example (for classification: a text) {"label", "probability" (of that label),
    "probabilities" ({label: probability})}, or for a model of scores (target = "score") {"score"}."""
    task, settings = task_of(ckpt)
    labels, regression = ckpt["labels"], is_regression(ckpt)
    data = ClassificationData([task.encode(e, tok, model.config.block_size, settings) for e in examples], [0] * len(examples))
    results = []
    for start in range(0, len(examples), batch_size):
        idx, mask, _ = to_device(data.batch(range(start, min(start + batch_size, len(examples))), tok.eot_token), device)
        logits = model(idx, mask)[0].float()
        if regression:
            results += [{"score": score} for score in logits[:, 0].tolist()]
            continue
        for p in torch.softmax(logits, dim=-1).tolist():
            best = max(range(len(labels)), key=p.__getitem__)
            results.append({"label": labels[best], "probability": p[best], "probabilities": dict(zip(labels, p))})
    return results


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(prog="python -m gpt.classify", description="Predict with a fine-tuned GPT.")
    p.add_argument("texts", nargs="*", metavar="TEXT", help="texts to classify (classification only)")
    p.add_argument("--out_dir", required=True, help="the fine-tuning run's directory")
    p.add_argument("--ckpt", default="best.pt", help="checkpoint in out_dir, or a path (default: best.pt)")
    p.add_argument("--input", default=None, help="a CSV, TSV or JSONL file of examples (the training file's columns)")
    p.add_argument("--output", default=None, help="where --input's predictions go (JSONL; default: stdout)")
    p.add_argument("--text_column", default=None, help="classification: the text column of --input "
                   "(default: the training one)")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    if not args.texts and not args.input:
        raise UserError("nothing to classify: give texts as arguments or --input=FILE")
    if any(not t.strip() for t in args.texts):
        raise UserError("an empty text cannot be classified: remove it")
    if args.batch_size < 1:
        raise UserError(f"--batch_size must be at least 1, got {args.batch_size}")
    if args.output:
        if not args.input:
            raise UserError("--output is for the predictions of --input=FILE: give --input too")
        check_writable(args.output, "--output")
    path = checkpoint_path(args.out_dir, args.ckpt)
    device = pick_device(args.device)
    model, tok, ckpt = load_model(path, task=FINE_TUNED, device=device)
    task, settings = task_of(ckpt)
    if ckpt["task"] != "classify" and (args.texts or args.text_column):
        raise UserError(f"{path} is a {ckpt['task']} model: its examples are not single texts; give them "
                        f"as --input=FILE with the columns of its training file")
    if args.texts:
        for text, result in zip(args.texts, predict(model, tok, ckpt, args.texts, device, args.batch_size)):
            shown = f"{result['score']:.4f}" if "score" in result else f"{result['label']}\t{result['probability']:.4f}"
            print(f"{shown}\t{text}")
    if args.input:
        if args.text_column:
            settings.text_column = args.text_column
        examples, _, skipped = task.read(args.input, settings, "--input", labelled=False)
        if ckpt.get("combine") == "choice" and len(examples[0][1]) != len(ckpt["labels"]):
            raise UserError(f"--input has {len(examples[0][1])} answers per question, the model was trained on "
                            f"{len(ckpt['labels'])}: give questions with {len(ckpt['labels'])} answers")
        predictions = predict(model, tok, ckpt, examples, device, args.batch_size)
        lines = (json.dumps({**task.describe(example, settings), **result}) + "\n"
                 for example, result in zip(examples, predictions))
        if not args.output:
            sys.stdout.writelines(lines)
            return
        with atomic_path(args.output) as tmp:  # the file appears complete, or not at all
            with open(tmp, "w") as f:
                f.writelines(lines)
        print(f"predicted {len(examples)} {task.noun} from {args.input} into {args.output}"
              + (f" (skipped {skipped} empty)" if skipped else ""), file=sys.stderr)


if __name__ == "__main__":
    main()
