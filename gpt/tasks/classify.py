"""Text classification: fine-tune a GPT on labelled text (run.task = "classify").

Training runs through train.py with a [classify] section (see
configs/finetune_sms_spam.toml), so DDP, AMP, compile, checkpoints, exact resume
and logging are those of pretraining. The data is a CSV, TSV or JSON Lines file
of texts and labels; the network is a GPT backbone (from run.init_from: our
language model, a Hugging Face GPT-2, or scratch) with a linear head on the
final hidden state of each text's last token (gpt.model.GPTClassifier).
Evaluation reports loss, accuracy, macro-F1, per-class precision, recall and F1
and the confusion matrix; a test file is evaluated with best.pt at the end. With
target = "score" the labels are numbers and the task is a regression (a head of one
output, mean squared error), evaluated by Pearson's and Spearman's correlations.

Labelling new texts with the result: python -m gpt.classify (gpt/classify.py).
GPT-1's input transformations (gpt/tasks/gpt1.py: entailment, similarity, multiple
choice) are this task with other examples: the Classification class below says what
they override.
"""

from __future__ import annotations

import csv
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from gpt.dataset import WindowSampler
from gpt.errors import UserError, require
from gpt.init import Start, initial_model, with_tokens
from gpt.model import GPTClassifier, pad_sequences
from gpt.prepare import jsonl_records
from gpt.system import Processes, to_device
from gpt.tokenizer import Tokenizer, get_tokenizer


LABEL_METRICS, SCORE_METRICS = ("accuracy", "macro_f1"), ("pearson", "spearman")  # and val_loss, for either


@dataclass
class LabeledConfig:
    """What every fine-tuning task's section has ([classify], and gpt/tasks/gpt1.py's)."""

    train_file: str = ""  # CSV, TSV or JSON Lines with the task's text columns and a label column
    val_file: str = ""  # "": a split of train_file (val_fraction; stratified by label)
    test_file: str = ""  # optional: evaluated with the best checkpoint at the end
    val_fraction: float = 0.1
    label_column: str = "label"
    target: str = "label"  # "label": classes; "score": a number to predict (STS-B's similarity), a regression
    truncate: str = "head"  # texts longer than block_size keep their "head" or their "tail"
    tokenizer: str = "gpt2"  # from scratch only; a pretrained backbone brings its own
    scratch_if_missing: bool = False  # run.init_from names a checkpoint that does not exist: train from scratch
    freeze_backbone: bool = False  # train the head only
    head_dropout: float = 0.1
    lm_loss_weight: float = 0.0  # auxiliary language-modelling loss (GPT-1 used 0.5)
    # chooses best.pt: val_loss | accuracy | macro_f1 (labels) | pearson | spearman (scores); "": macro_f1 or pearson
    best_metric: str = ""

    def __post_init__(self):
        require(0 <= self.val_fraction < 1, "val_fraction", "in [0, 1)", self.val_fraction)
        require(self.truncate in ("head", "tail"), "truncate", '"head" or "tail"', self.truncate)
        require(self.target in ("label", "score"), "target", '"label" or "score"', self.target)
        require(0 <= self.head_dropout < 1, "head_dropout", "in [0, 1)", self.head_dropout)
        require(self.lm_loss_weight >= 0, "lm_loss_weight", "non-negative", self.lm_loss_weight)
        own = ("val_loss", *(SCORE_METRICS if self.target == "score" else LABEL_METRICS))
        require(self.best_metric in ("", *own), "best_metric", f"one of {', '.join(own)} with target = {self.target!r}",
                self.best_metric)

    @property
    def chosen_metric(self) -> str:
        """best_metric, or where it is "" the target's own: macro-F1 for labels, Pearson's r for scores."""
        return self.best_metric or ("pearson" if self.target == "score" else "macro_f1")


@dataclass
class ClassifyConfig(LabeledConfig):
    """The [classify] section of a config."""

    text_column: str = "text"


# ---- labelled data ----------------------------------------------------------------------------------


def read_labeled(path: str | Path, text_column: str, label_column: str | None,
                 setting: str = "classify.train_file", numbers: bool = False) -> tuple[list[str], list, int]:
    """(texts, labels, skipped) from a CSV, TSV or JSON Lines file with a header / keys.

    Labels are kept as strings ("1" and 1 are the same label); with numbers, each must be a
    number (target = "score"); label_column None reads texts only (labels are then None). Rows whose text is empty are skipped and counted.
    Errors name the file and line; `setting` is what named the file (for messages).
    """
    texts, labels, skipped = [], [], 0
    for where, row in read_rows(path, setting):
        require_columns(where, row, [text_column, label_column])
        if not filled(row[text_column]):
            skipped += 1
            continue
        texts.append(str(row[text_column]))
        labels.append(None if label_column is None else row_label(where, row, label_column, numbers))
    if not texts:
        raise UserError(f"{path} holds no rows with text")
    return texts, labels, skipped


def read_rows(path: str | Path, setting: str):
    """(where, row) of each record of a CSV, TSV or JSON Lines file; where is "file:line"."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise UserError(f"{setting}: {path} {what}: name a CSV, TSV or JSON Lines file")
    return _jsonl_rows(path) if ".jsonl" in path.suffixes else _csv_rows(path)


def require_columns(where: str, row: dict, columns) -> None:
    missing = [c for c in columns if c is not None and c not in row]
    if missing:
        found = excerpt(", ".join(map(str, row)))
        raise UserError(f"{where}: no column {missing[0]!r} (columns found: {found}): name the right columns")


def filled(value) -> bool:
    """A text that is there: not missing, not empty or blank."""
    return value is not None and bool(str(value).strip())


def row_label(where: str, row: dict, label_column: str, number: bool = False) -> str:
    """A row's label as a string ("1" and 1 are the same label); an empty one is refused, and
    with number one that is not a number a float32 holds (target = "score")."""
    if not filled(row[label_column]):
        raise UserError(f"{where}: the label is empty: every row needs a label")
    label = str(row[label_column]).strip()
    if number:
        try:
            value = float(label)
        except ValueError:
            value = math.inf
        if not abs(value) <= torch.finfo(torch.float32).max:  # also NaN
            raise UserError(f'{where}: the label {excerpt(label)!r} is not a number: with target = "score" every '
                            f'label is one (or set target = "label")')
    return label


def excerpt(text: str, limit: int = 80) -> str:
    """A short, printable piece of untrusted text for an error line (escapes, then cut)."""
    shown = text.encode("unicode_escape").decode("ascii")
    return shown if len(shown) <= limit else shown[:limit] + "..."


def _csv_rows(path: Path):
    delimiter = "\t" if path.suffix in (".tsv", ".tab") else ","
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.reader(f, delimiter=delimiter)
        header = next(reader, None)
        if not header:
            raise UserError(f"{path} is empty: it needs a header row naming its columns")
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if not row:
                continue
            if len(row) != len(header):
                raise UserError(f"{where}: {len(row)} fields where the header has {len(header)}: "
                                f"fix the line (quote fields that contain the delimiter)")
            yield where, dict(zip(header, row))


def _jsonl_rows(path: Path):
    with open(path, encoding="utf-8", errors="replace") as f:
        yield from jsonl_records(f, path)


def label_order(labels) -> list[str]:
    """Distinct labels, numerically sorted when they are all integers ("2" before "10")."""
    distinct = set(labels)
    numeric = all(lab.lstrip("-").isdigit() for lab in distinct)
    return sorted(distinct, key=int if numeric else str)


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson's correlation of two vectors; 0 when either is constant (no linear relation to
    measure), NaN when either holds a NaN or an infinity (a diverged model)."""
    if not (x.isfinite().all() and y.isfinite().all()):
        return math.nan
    x, y = x - x.mean(), y - y.mean()
    norm = (x.norm() * y.norm()).item()
    return (x @ y).item() / norm if norm > 0 else 0.0


def ranks(x: torch.Tensor) -> torch.Tensor:
    """The rank of each element (0 = smallest), ties sharing their mean rank: Pearson's r of the
    ranks is Spearman's rho."""
    rank = torch.empty_like(x)
    rank[x.argsort()] = torch.arange(len(x), dtype=x.dtype)
    _, group = torch.unique(x, return_inverse=True)
    mean = torch.zeros(int(group.max()) + 1, dtype=x.dtype).index_add_(0, group, rank)
    return (mean / torch.bincount(group).to(x.dtype))[group]


def stratified_split(labels: list[str], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Row indices (train, val): `fraction` of each label's rows, chosen from `seed`, go to val
    (a plain random split where every label is the same)."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label in sorted(set(labels)):
        rows = [i for i, lab in enumerate(labels) if lab == label]
        rng.shuffle(rows)
        n_val = int(round(len(rows) * fraction))
        if 0 < fraction and n_val == 0 and len(rows) > 1:
            n_val = 1
        val += rows[:n_val]
        train += rows[n_val:]
    return sorted(train), sorted(val)


class ClassificationData:
    """Each example's token sequences (one, or K for GPT-1's transformations) and label ids;
    batches padded to their longest sequence."""

    def __init__(self, sequences: list[list[list[int]]], targets: list[int] | list[float], regression: bool = False):
        self.sequences = sequences
        self.labels = torch.tensor(targets, dtype=torch.float32 if regression else torch.long)  # label ids, or scores

    def __len__(self) -> int:
        return len(self.sequences)

    def batch(self, indices, pad_id: int = 0, left: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(idx, attention_mask, labels) for rows `indices`: ids and 1/0 mask of shape (B, longest),
        or (B, K, longest) when the examples have K sequences each; (B,) label ids or scores."""
        rows = [self.sequences[i] for i in indices]
        idx, mask = pad_sequences([seq for row in rows for seq in row], pad_id, left=left)
        if len(rows[0]) > 1:
            idx, mask = idx.view(len(rows), -1, idx.size(1)), mask.view(len(rows), -1, mask.size(1))
        return idx, mask, self.labels[torch.as_tensor(indices, dtype=torch.long)]


# ---- the task -----------------------------------------------------------------------------------------


class Classification:
    """Labelled single texts. gpt/tasks/gpt1.py's tasks are this with other examples: they
    override the class attributes and the methods of the next section."""

    Settings = ClassifyConfig
    added_tokens: tuple[str, ...] = ()  # tokens the examples are written with (gpt.tokenizer.with_added)
    combine = "sum"  # how an example's sequences make its scores (GPTClassifier)
    noun = "texts"  # what an example is, for messages

    # ---- the examples ----------------------------------------------------------------------------------

    @classmethod
    def read(cls, path, settings, setting: str, labelled: bool = True) -> tuple[list, list, int]:
        """(examples, labels (None if not labelled), rows skipped for empty text) of a file."""
        return read_labeled(path, settings.text_column, settings.label_column if labelled else None, setting,
                            numbers=settings.target == "score")

    @classmethod
    def texts(cls, example) -> list[str]:
        """The texts of an example (a scratch tokenizer's vocabulary comes from them)."""
        return [example]

    @classmethod
    def encode(cls, example, tok: Tokenizer, block_size: int, settings) -> list[list[int]]:
        """The token sequences the network reads for one example, each at most block_size."""
        ids = tok.encode(example)
        return [ids[:block_size] if settings.truncate == "head" else ids[-block_size:]]

    @classmethod
    def describe(cls, example, settings) -> dict:
        """An example as the fields of a predictions line (gpt.classify)."""
        return {"text": example}

    def label_names(self, examples: list, labels: list[str]) -> list[str]:
        """The head's outputs in order (examples, labels: the training data)."""
        return label_order(labels)

    # ---- the data ----------------------------------------------------------------------------------------

    def __init__(self, cfg, procs: Processes):  # cfg: the run's gpt.config.Config
        task = cfg.run.task
        c = getattr(cfg, task)
        self.cfg, self.settings, self.procs = cfg, c, procs
        self.regression = c.target == "score"  # one number per example, not a label
        self.best_metric = c.chosen_metric
        self.higher_is_better = self.best_metric != "val_loss"
        if not c.train_file:
            raise UserError(f'run.task = "{task}" needs {task}.train_file (a CSV, TSV or JSONL file)')
        examples, labels, skipped = self.read(c.train_file, c, f"{task}.train_file")
        if c.val_file:
            val_examples, val_labels, skipped_val = self.read(c.val_file, c, f"{task}.val_file")
            skipped += skipped_val
        else:
            strata = [None] * len(labels) if self.regression else labels  # scores: a plain random split
            train_rows, val_rows = stratified_split(strata, c.val_fraction, cfg.run.seed)
            if not val_rows:
                raise UserError(f"no validation data: set {task}.val_file or a {task}.val_fraction above 0")
            val_examples, val_labels = [examples[i] for i in val_rows], [labels[i] for i in val_rows]
            examples, labels = [examples[i] for i in train_rows], [labels[i] for i in train_rows]
        self.raw = {"train": (examples, labels), "val": (val_examples, val_labels)}
        if c.test_file:
            test_examples, test_labels, skipped_test = self.read(c.test_file, c, f"{task}.test_file")
            self.raw["test"] = (test_examples, test_labels)
            skipped += skipped_test
        if self.regression:
            self.labels = ["score"]  # the head's one output
            self.raw = {split: (split_examples, [float(score) for score in split_labels])
                        for split, (split_examples, split_labels) in self.raw.items()}
            labels = self.raw["train"][1]
            if min(labels) == max(labels):
                raise UserError(f"every training score is {labels[0]:g}: a regression needs different values")
            counts = f"scores {min(labels):g} to {max(labels):g}, mean {sum(labels) / len(labels):.3g}"
        else:
            self.labels = self.label_names(examples, labels)
            if len(self.labels) < 2:
                raise UserError(f"{c.train_file} has a single label ({self.labels[0]!r}): classification needs two or "
                                f"more (or {task}.target = \"score\" for numbers)")
            for split, (_, split_labels) in self.raw.items():
                unseen = sorted(set(split_labels) - set(self.labels))
                if unseen:
                    raise UserError(f"the {split} data has label(s) never seen in training: "
                                    f"{', '.join(map(repr, unseen))}: add training examples or remove those rows")
            counts = ", ".join(f"{lab} {labels.count(lab)}" for lab in self.labels)
        self.eval_splits, self.final_splits = ("val",), ("test",) if c.test_file else ()
        procs.note(f"{task}: {len(examples)} training {self.noun} ({counts}), {len(val_examples)} validation"
                   + (f", {len(self.raw['test'][0])} test" if c.test_file else "")
                   + (f"; skipped {skipped} row(s) with empty text" if skipped else ""))

    # ---- the model -----------------------------------------------------------------------------------

    def build_model(self, device) -> tuple[GPTClassifier, Start]:
        cfg, c, task = self.cfg, self.settings, self.cfg.run.task
        corpus = lambda: "".join(t for example in self.raw["train"][0] for t in self.texts(example))  # noqa: E731
        start = initial_model(cfg, scratch_tokenizer=lambda: get_tokenizer(c.tokenizer, text=corpus()),
                              vocab_source=f"the {c.tokenizer} tokenizer", scratch_if_missing=c.scratch_if_missing,
                              note=self.procs.note, device=device)
        if start.checkpoint is not None and start.checkpoint["labels"] != self.labels:
            raise UserError(f"the checkpoint in {cfg.run.out_dir} has labels {start.checkpoint['labels']}, the data "
                            f"{self.labels}: resume with the same data")
        if cfg.is_set(f"{task}.tokenizer") and start.checkpoint is None and c.tokenizer != start.tokenizer.name:
            raise UserError(f"{task}.tokenizer = {c.tokenizer!r}, but the backbone uses the {start.tokenizer.name} "
                            f"tokenizer: remove {task}.tokenizer or start from a {c.tokenizer} backbone")
        start = with_tokens(start, list(self.added_tokens))
        self.tokenizer, self.objective = start.tokenizer, start.objective
        if c.lm_loss_weight and self.objective != "causal":
            raise UserError(f"{task}.lm_loss_weight is next-token prediction, but the backbone was trained as a "
                            f"{self.objective} LM and reads every token both ways: set {task}.lm_loss_weight = 0")
        backbone = start.model
        if c.freeze_backbone:
            if self.added_tokens:
                raise UserError(f"{task}.freeze_backbone would also freeze the new embeddings of the tokens this task "
                                f"adds ({', '.join(self.added_tokens)}), which must be learned: set it to false")
            backbone.requires_grad_(False)

        self.batch_size, T = cfg.batch.batch_size, backbone.config.block_size
        ids = {lab: i for i, lab in enumerate(self.labels)}
        self.data = {split: ClassificationData([self.encode(e, self.tokenizer, T, c) for e in examples],
                                               labels if self.regression else [ids[lab] for lab in labels],
                                               self.regression)
                     for split, (examples, labels) in self.raw.items()}
        p = self.procs
        self.sampler = WindowSampler(len(self.data["train"]), self.batch_size, seed=cfg.run.seed,
                                     rank=p.rank, world_size=p.world_size)
        model = GPTClassifier(backbone, 1 if self.combine == "choice" else len(self.labels), dropout=c.head_dropout,
                              combine=self.combine, bidirectional=self.objective != "causal")
        return model, start

    # ---- training ----------------------------------------------------------------------------------------

    def grad_accum(self) -> int:
        if self.cfg.batch.tokens_per_step:
            raise UserError("batch.tokens_per_step is for language modelling: set batch.batch_size and "
                            "batch.grad_accum for classification")
        return self.cfg.batch.grad_accum

    def describe_step(self, grad_accum: int) -> str:
        w = self.procs.world_size
        return f"{self.batch_size * grad_accum * w} {self.noun} per step ({self.batch_size} x {grad_accum} accumulation x {w})"

    def next_batch(self) -> tuple[torch.Tensor, ...]:
        return self.data["train"].batch(self.sampler.next_indices(), pad_id=self.tokenizer.eot_token)

    def loss(self, model, batch) -> torch.Tensor:
        return model(*batch, lm_loss_weight=self.settings.lm_loss_weight)[1]

    # ---- evaluation ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, model, split: str, device, each_batch: Callable) -> dict[str, torch.Tensor]:
        """Over this process's share of a split: the summed loss, and the confusion matrix (labels)
        or the predicted scores in their rows' places, zero elsewhere (scores: the sum over the
        processes is every prediction)."""
        data, n = self.data[split], len(self.labels)
        mine = list(range(self.procs.rank, len(data), self.procs.world_size))
        sums = {"loss": torch.zeros((), device=device)}
        if self.regression:
            sums["predicted"] = torch.zeros(len(data), device=device)
        else:
            sums["confusion"] = torch.zeros(n * n, device=device)
        share = -(-len(data) // self.procs.world_size)  # the largest share: every process runs as many batches
        for start in range(0, share, self.batch_size):  # (under FSDP the processes run each forward together)
            chunk = mine[start : start + self.batch_size]
            idx, mask, labels = to_device(data.batch(chunk or mine[:1] or [0], self.tokenizer.eot_token), device)
            with each_batch():
                logits, batch_loss = model(idx, mask, labels)
            if chunk:  # else a stand-in batch, not counted
                sums["loss"] += batch_loss.float() * len(labels)
                if self.regression:
                    sums["predicted"][torch.as_tensor(chunk, device=device)] = logits[:, 0].float()
                else:
                    sums["confusion"] += torch.bincount(labels * n + logits.argmax(-1), minlength=n * n).float()
        return sums

    def summarize(self, sums: dict[str, dict[str, torch.Tensor]]) -> tuple[dict, str]:
        metrics, lines = {}, []
        for split, s in sums.items():
            split_metrics, split_lines = self._summarize_split(split, s)
            metrics.update(split_metrics)
            lines += split_lines
        return metrics, "\n".join(lines)

    def _summarize_split(self, split: str, sums: dict[str, torch.Tensor]) -> tuple[dict, list[str]]:
        key = (lambda name: name) if split == "val" else (lambda name: f"{split}_{name}")  # noqa: E731
        if self.regression:
            predicted, true = sums["predicted"].double().cpu(), self.data[split].labels.double()
            loss, r, rho = sums["loss"].item() / len(true), pearson(predicted, true), pearson(ranks(predicted), ranks(true))
            return ({f"{split}_loss": loss, key("pearson"): r, key("spearman"): rho},
                    [f"{split} loss (mean squared error) {loss:.4f}, Pearson {r:.4f}, Spearman {rho:.4f}"])
        n = len(self.labels)
        confusion = sums["confusion"].view(n, n).long()  # rows: true label, columns: predicted
        tp = confusion.diag().double()
        precision = (tp / confusion.sum(0).clamp(min=1)).tolist()
        recall = (tp / confusion.sum(1).clamp(min=1)).tolist()
        f1 = [2 * p * r / (p + r) if p + r else 0.0 for p, r in zip(precision, recall)]
        total = confusion.sum().item()
        loss, accuracy, macro_f1 = sums["loss"].item() / total, tp.sum().item() / total, sum(f1) / n
        metrics = {f"{split}_loss": loss, key("accuracy"): accuracy, key("macro_f1"): macro_f1,
                   key("precision"): dict(zip(self.labels, precision)), key("recall"): dict(zip(self.labels, recall)),
                   key("confusion"): confusion.tolist()}
        width = max(len(lab) for lab in self.labels)
        lines = [f"{split} loss {loss:.4f}, accuracy {accuracy:.2%}, macro-F1 {macro_f1:.4f}"]
        lines += [f"    {lab:>{width}}: precision {p:.3f}, recall {r:.3f}, F1 {f:.3f}"
                  for lab, p, r, f in zip(self.labels, precision, recall, f1)]
        lines.append(f"    confusion (rows: true {', '.join(self.labels)}; columns: predicted): {confusion.tolist()}")
        return metrics, lines

    # ---- checkpoints -----------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)

    def checkpoint_info(self) -> dict:
        return {"tokenizer": self.tokenizer.spec(), "labels": self.labels, self.cfg.run.task: asdict(self.settings),
                "combine": self.combine, "objective": self.objective}
