"""Classify new texts with a fine-tuned model: python -m gpt.classify.

    python -m gpt.classify --out_dir=out/sms_spam "WINNER!! Claim your prize now" "see you at 6"
    python -m gpt.classify --out_dir=out/sms_spam --input=messages.csv --output=predictions.jsonl

The model comes from a run of the classification task (gpt/tasks/classify.py,
run.task = "classify"): its best.pt by default. Each text gets the label with
the highest probability; --input files (CSV, TSV or JSON Lines) give one JSON
line per text with every label's probability.
"""

from __future__ import annotations

import json
import sys

import torch

from gpt.checkpoint import checkpoint_path, load_model
from gpt.atomic import atomic_path, check_writable
from gpt.errors import ArgumentParser, UserError, exit_on_user_error
from gpt.model import GPTClassifier
from gpt.system import pick_device, to_device
from gpt.tasks.classify import ClassificationData, read_labeled
from gpt.tokenizer import Tokenizer


# ---- prediction ------------------------------------------------------------------------------------


@torch.no_grad()
def predict(model: GPTClassifier, tok: Tokenizer, ckpt: dict, texts: list[str], device, batch_size: int = 64):
    """[(label, probability of that label, {label: probability})] for each text."""
    labels, truncate = ckpt["labels"], ckpt["classify"]["truncate"]
    data = ClassificationData(texts, [0] * len(texts), tok, model.config.block_size, truncate)
    results = []
    for start in range(0, len(texts), batch_size):
        idx, mask, _ = to_device(data.batch(range(start, min(start + batch_size, len(texts))), tok.eot_token), device)
        probs = torch.softmax(model(idx, mask)[0].float(), dim=-1).tolist()
        for p in probs:
            best = max(range(len(labels)), key=p.__getitem__)
            results.append((labels[best], p[best], dict(zip(labels, p))))
    return results


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(prog="python -m gpt.classify", description="Classify text with a fine-tuned GPT.")
    p.add_argument("texts", nargs="*", metavar="TEXT", help="texts to classify")
    p.add_argument("--out_dir", required=True, help="the fine-tuning run's directory")
    p.add_argument("--ckpt", default="best.pt", help="checkpoint in out_dir, or a path (default: best.pt)")
    p.add_argument("--input", default=None, help="a CSV, TSV or JSONL file of texts to classify")
    p.add_argument("--output", default=None, help="where --input's predictions go (JSONL; default: stdout)")
    p.add_argument("--text_column", default=None, help="the text column of --input (default: the training one)")
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
    model, tok, ckpt = load_model(path, task="classify", device=device)
    if args.texts:
        for text, (label, prob, _) in zip(args.texts, predict(model, tok, ckpt, args.texts, device, args.batch_size)):
            print(f"{label}\t{prob:.4f}\t{text}")
    if args.input:
        column = args.text_column or ckpt["classify"]["text_column"]
        texts, _, skipped = read_labeled(args.input, column, None, setting="--input")
        lines = (json.dumps({"text": text, "label": label, "probability": prob, "probabilities": probs}) + "\n"
                 for text, (label, prob, probs) in zip(texts, predict(model, tok, ckpt, texts, device, args.batch_size)))
        if not args.output:
            sys.stdout.writelines(lines)
            return
        with atomic_path(args.output) as tmp:  # the file appears complete, or not at all
            with open(tmp, "w") as f:
                f.writelines(lines)
        print(f"classified {len(texts)} texts from {args.input} into {args.output}"
              + (f" (skipped {skipped} empty)" if skipped else ""), file=sys.stderr)


if __name__ == "__main__":
    main()
