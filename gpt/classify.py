"""Text classification: fine-tune a GPT on labelled text, then classify new text with it.

Training runs through train.py with run.task = "classify" and a [classify] section
(see configs/finetune_sms_spam.toml), so DDP, AMP, compile, checkpoints, exact
resume and logging are those of pretraining. This module holds the task the
Trainer runs (data, model, loss, evaluation) and the prediction command:

    python -m gpt.classify --out_dir=out/sms_spam "WINNER!! Claim your prize now" "see you at 6"
    python -m gpt.classify --out_dir=out/sms_spam --input=messages.csv --output=predictions.jsonl

The model is the GPT backbone plus a linear head on the final hidden state of each
text's last real token (gpt.model.GPTClassifier). It starts from our language-model
checkpoint, a Hugging Face GPT-2, or scratch. Evaluation reports loss, accuracy,
macro-F1, per-class precision and recall and the confusion matrix.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from gpt.checkpoint import checkpoint_path, load_checkpoint
from gpt.config import Config
from gpt.dataset import ClassificationData, WindowSampler, read_labeled, stratified_split, to_device
from gpt.errors import UserError, exit_on_user_error
from gpt.hf import HUB_MODELS
from gpt.model import GPT, GPTClassifier, GPTConfig
from gpt.tokenizer import Tokenizer, from_spec, get_tokenizer


def label_order(labels) -> list[str]:
    """Distinct labels, numerically sorted when they are all integers ("2" before "10")."""
    distinct = set(labels)
    numeric = all(lab.lstrip("-").isdigit() for lab in distinct)
    return sorted(distinct, key=int if numeric else str)


def find_backbone(init_from: str) -> Path | None:
    """Our checkpoint named by run.init_from: a .pt file, or a run directory (best.pt, else ckpt.pt)."""
    path = Path(init_from)
    if path.is_file() and path.suffix == ".pt":
        return path
    for name in ("best.pt", "ckpt.pt"):
        if (path / name).is_file():
            return path / name
    return None


class Classification:
    """Fine-tuning on labelled text (run.task = "classify")."""

    def __init__(self, cfg: Config, procs):
        c = cfg.classify
        self.cfg, self.procs = c, procs
        self.best_metric, self.higher_is_better = c.best_metric, c.best_metric != "val_loss"
        if not c.train_file:
            raise UserError('run.task = "classify" needs classify.train_file (a CSV, TSV or JSONL file)')
        texts, labels, skipped = read_labeled(c.train_file, c.text_column, c.label_column)
        if c.val_file:
            val_texts, val_labels, skipped_val = read_labeled(c.val_file, c.text_column, c.label_column)
            skipped += skipped_val
        else:
            train_rows, val_rows = stratified_split(labels, c.val_fraction, cfg.run.seed)
            if not val_rows:
                raise UserError("no validation data: set classify.val_file or a classify.val_fraction above 0")
            val_texts, val_labels = [texts[i] for i in val_rows], [labels[i] for i in val_rows]
            texts, labels = [texts[i] for i in train_rows], [labels[i] for i in train_rows]
        self.labels = label_order(labels)
        if len(self.labels) < 2:
            raise UserError(f"{c.train_file} has a single label ({self.labels[0]!r}): classification needs two or more")
        self.raw = {"train": (texts, labels), "val": (val_texts, val_labels)}
        if c.test_file:
            test_texts, test_labels, skipped_test = read_labeled(c.test_file, c.text_column, c.label_column)
            self.raw["test"] = (test_texts, test_labels)
            skipped += skipped_test
        for split, (_, split_labels) in self.raw.items():
            unseen = sorted(set(split_labels) - set(self.labels))
            if unseen:
                raise UserError(f"the {split} data has label(s) never seen in training: {', '.join(map(repr, unseen))}: "
                                f"add training examples or remove those rows")
        if procs.is_main:
            counts = ", ".join(f"{lab} {labels.count(lab)}" for lab in self.labels)
            print(f"classify: {len(texts)} training texts ({counts}), {len(val_texts)} validation"
                  + (f", {len(self.raw['test'][0])} test" if c.test_file else "")
                  + (f"; skipped {skipped} row(s) with empty text" if skipped else ""))

    # ---- the model -------------------------------------------------------------------------------

    def build_model(self, cfg: Config, ckpt: dict | None, out_dir: Path) -> GPTClassifier:
        from gpt.trainer import backbone_from_checkpoint, check_architecture, pretrained_gpt2

        c, init = self.cfg, cfg.run.init_from
        if ckpt is not None:  # resume
            if ckpt.get("labels") != self.labels:
                raise UserError(f"the checkpoint in {out_dir} has labels {ckpt.get('labels')}, the data {self.labels}: "
                                f"resume with the same data")
            self.tokenizer = from_spec(ckpt["tokenizer"])
            backbone = check_architecture(backbone_from_checkpoint(ckpt, cfg), cfg, f"the checkpoint in {out_dir}")
        elif init != "scratch" and (path := find_backbone(init)) is not None:  # our language model
            lm = load_checkpoint(path)
            if lm.get("task", "lm") != "lm":
                raise UserError(f"{path} is a {lm['task']} checkpoint: start from a language model's")
            self.tokenizer = from_spec(lm["tokenizer"])
            backbone = check_architecture(backbone_from_checkpoint(lm, cfg), cfg, str(path))
            backbone.load_state_dict(lm["model"])
            self._note(f"backbone: the language model in {path} (iteration {lm['iter']})")
        elif init in HUB_MODELS or (init != "scratch" and (Path(init).exists()
                                                           or not (c.scratch_if_missing or _is_local_path(init)))):
            self.tokenizer = get_tokenizer("gpt2")  # a Hugging Face GPT-2: a directory, or a hub id
            backbone = pretrained_gpt2(cfg)
        elif init == "scratch" or c.scratch_if_missing:
            if init != "scratch":
                self._note(f"note: {init} does not exist: training from scratch (classify.scratch_if_missing)")
            self.tokenizer = get_tokenizer(c.tokenizer, text="".join(self.raw["train"][0]))
            backbone = GPT(dataclasses.replace(cfg.model, vocab_size=self.tokenizer.vocab_size))
        else:
            raise UserError(f"run.init_from {init!r} does not exist: name a run directory with a checkpoint, a .pt "
                            f"file, a Hugging Face GPT-2 or \"scratch\" (or set classify.scratch_if_missing = true)")
        if "classify.tokenizer" in cfg.explicit and ckpt is None and c.tokenizer != self.tokenizer.name:
            raise UserError(f"classify.tokenizer = {c.tokenizer!r}, but the backbone uses the {self.tokenizer.name} "
                            f"tokenizer: remove classify.tokenizer or start from a {c.tokenizer} backbone")
        if c.freeze_backbone:
            backbone.requires_grad_(False)
        return GPTClassifier(backbone, len(self.labels), dropout=c.head_dropout)

    def _note(self, line: str) -> None:
        if self.procs.is_main:
            print(line)

    # ---- data for the Trainer ---------------------------------------------------------------------

    def setup(self, cfg: Config) -> None:
        self.batch_size, T, ids = cfg.batch.batch_size, cfg.model.block_size, {lab: i for i, lab in enumerate(self.labels)}
        self.data = {split: ClassificationData(texts, [ids[lab] for lab in labels], self.tokenizer, T, self.cfg.truncate)
                     for split, (texts, labels) in self.raw.items()}
        p = self.procs
        self.sampler = WindowSampler(len(self.data["train"]), self.batch_size, seed=cfg.run.seed,
                                     rank=p.rank, world_size=p.world_size)

    def grad_accum(self, cfg: Config) -> int:
        if cfg.batch.tokens_per_step:
            raise UserError("batch.tokens_per_step is for language modelling: set batch.batch_size and "
                            "batch.grad_accum for classification")
        return cfg.batch.grad_accum

    def describe_step(self, grad_accum: int) -> str:
        w = self.procs.world_size
        return f"{self.batch_size * grad_accum * w} texts per step ({self.batch_size} x {grad_accum} accumulation x {w})"

    def next_batch(self) -> tuple[torch.Tensor, ...]:
        return self.data["train"].batch(self.sampler.next_indices(), pad_id=self.tokenizer.eot_token)

    def loss(self, model, batch) -> torch.Tensor:
        return model(*batch, lm_loss_weight=self.cfg.lm_loss_weight)[1]

    @torch.no_grad()
    def evaluate(self, model, device, autocast, split: str = "val") -> dict[str, torch.Tensor]:
        """Summed loss and the confusion matrix over this process's share of a split."""
        data, n = self.data[split], len(self.labels)
        mine = list(range(self.procs.rank, len(data), self.procs.world_size))
        loss, confusion = torch.zeros((), device=device), torch.zeros(n * n, device=device)
        for start in range(0, len(mine), self.batch_size):
            idx, mask, labels = to_device(data.batch(mine[start : start + self.batch_size], self.tokenizer.eot_token), device)
            with autocast():
                logits, batch_loss = model(idx, mask, labels)
            loss += batch_loss.float() * len(labels)
            confusion += torch.bincount(labels * n + logits.argmax(-1), minlength=n * n).float()
        return {"loss": loss, "confusion": confusion}

    def summarize(self, sums: dict[str, torch.Tensor], split: str = "val") -> tuple[dict, str]:
        n = len(self.labels)
        confusion = sums["confusion"].view(n, n).long()  # rows: true label, columns: predicted
        tp = confusion.diag().double()
        precision = (tp / confusion.sum(0).clamp(min=1)).tolist()
        recall = (tp / confusion.sum(1).clamp(min=1)).tolist()
        f1 = [2 * p * r / (p + r) if p + r else 0.0 for p, r in zip(precision, recall)]
        total = confusion.sum().item()
        loss, accuracy, macro_f1 = sums["loss"].item() / total, tp.sum().item() / total, sum(f1) / n
        key = (lambda name: name) if split == "val" else (lambda name: f"{split}_{name}")
        metrics = {f"{split}_loss": loss, key("accuracy"): accuracy, key("macro_f1"): macro_f1,
                   key("precision"): dict(zip(self.labels, precision)), key("recall"): dict(zip(self.labels, recall)),
                   key("confusion"): confusion.tolist()}
        width = max(len(lab) for lab in self.labels)
        lines = [f"{split} loss {loss:.4f}, accuracy {accuracy:.2%}, macro-F1 {macro_f1:.4f}"]
        lines += [f"    {lab:>{width}}: precision {p:.3f}, recall {r:.3f}, F1 {f:.3f}"
                  for lab, p, r, f in zip(self.labels, precision, recall, f1)]
        lines.append(f"    confusion (rows: true {', '.join(self.labels)}; columns: predicted): {confusion.tolist()}")
        return metrics, "\n".join(lines)

    def checkpoint_extras(self) -> dict:
        return {"tokenizer": self.tokenizer.spec(), "labels": self.labels, "classify": dataclasses.asdict(self.cfg)}

    def finish(self, trainer) -> None:
        """At the end of training: the test split, if any, with the best checkpoint's weights."""
        if "test" not in self.data:
            return
        trainer._barrier()
        best = load_checkpoint(trainer.out_dir / "best.pt")
        trainer.raw_model.load_state_dict(best["model"])
        metrics, line = trainer.evaluate(split="test")
        trainer._record({"iter": best["iter"], **metrics}, f"test (best checkpoint, iteration {best['iter']}): {line}")


def _is_local_path(name: str) -> bool:
    """Written like a file path (not like a hub id such as gpt2 or owner/name)."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or name.endswith(".pt")


# ---- prediction ------------------------------------------------------------------------------------


def load_classifier(path: Path, device) -> tuple[GPTClassifier, Tokenizer, dict]:
    ckpt = load_checkpoint(path)
    if ckpt.get("task") != "classify":
        raise UserError(f"{path} is not a classifier checkpoint: train one with run.task = \"classify\"")
    model = GPTClassifier(GPT(GPTConfig(**ckpt["model_config"])), len(ckpt["labels"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), from_spec(ckpt["tokenizer"]), ckpt


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
    from gpt.trainer import pick_device

    p = argparse.ArgumentParser(prog="python -m gpt.classify", description="Classify text with a fine-tuned GPT.")
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
    path = checkpoint_path(args.out_dir, args.ckpt)
    device = pick_device(args.device)
    model, tok, ckpt = load_classifier(path, device)
    if args.texts:
        for text, (label, prob, _) in zip(args.texts, predict(model, tok, ckpt, args.texts, device, args.batch_size)):
            print(f"{label}\t{prob:.4f}\t{text}")
    if args.input:
        column = args.text_column or ckpt["classify"]["text_column"]
        texts, _, skipped = read_labeled(args.input, column, None)
        out = open(args.output, "w") if args.output else sys.stdout
        try:
            for text, (label, prob, probs) in zip(texts, predict(model, tok, ckpt, texts, device, args.batch_size)):
                out.write(json.dumps({"text": text, "label": label, "probability": prob, "probabilities": probs}) + "\n")
        finally:
            if out is not sys.stdout:
                out.close()
        if args.output:
            print(f"classified {len(texts)} texts from {args.input} into {args.output}"
                  + (f" (skipped {skipped} empty)" if skipped else ""), file=sys.stderr)


if __name__ == "__main__":
    main()
