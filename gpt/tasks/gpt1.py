"""GPT-1's input transformations: one pretrained model for every task, by rewriting the input.

GPT-1 (Radford et al. 2018, section 3.3) fine-tunes the same network on tasks whose
inputs are not one text, by writing each input as token sequences framed by three
added tokens with learned embeddings: start <s>, delimiter $ and extract <e>. The
linear head reads the final hidden state of the extract token (the last one):

    entailment        <s> premise $ hypothesis <e>                  -> a label
    similarity        <s> a $ b <e>  and  <s> b $ a <e>             -> their final states added -> a label,
                      (a pair has no natural order, so both are read)  or a score (target = "score")
    multiple_choice   <s> context $ answer_i <e>  for each answer    -> one score each, a softmax
                      across the answers; the label is the right answer's index (0, 1, ...)

Everything else is the classification task (gpt/tasks/classify.py): the data files
(CSV, TSV or JSON Lines), their checks, training, evaluation, checkpoints and
predictions with python -m gpt.classify. A multiple-choice row holds its answers as a
JSON list (JSON Lines, as HellaSwag's "endings") or as numbered columns endings0,
endings1, ... (CSV/TSV, as SWAG's ending0, ending1, ...); every row has the same number.

A pair longer than block_size - 3 tokens is cut: the second text keeps its head (at least
half the room), the first text its `truncate` end ("tail" for multiple choice: the end
of the context, next to the answer).
"""

from __future__ import annotations

from dataclasses import dataclass

from gpt.errors import UserError, require
from gpt.tasks.classify import Classification, LabeledConfig, excerpt, filled, read_rows, require_columns, row_label
from gpt.tokenizer import Tokenizer

SPECIAL = ("start", "delimiter", "extract")  # GPT-1's <s>, $ and <e> (added tokens)


def framed(tok: Tokenizer, first: str, second: str, block_size: int, truncate: str) -> list[int]:
    """<s> first $ second <e> as token ids, cut to block_size (see the module docstring)."""
    s, d, e = (tok.added_id(name) for name in SPECIAL)
    a, b = tok.encode(first), tok.encode(second)
    room = block_size - 3
    if room < 2:
        raise UserError(f"block_size = {block_size} leaves no room for two texts between GPT-1's three added tokens")
    b = b[: max(room - len(a), room // 2)]
    keep = room - len(b)
    a = a[:keep] if truncate == "head" else a[max(0, len(a) - keep):]
    return [s, *a, d, *b, e]


def read_pairs(path, settings, setting: str, columns: tuple[str, str], labelled: bool):
    """(examples (first, second), labels, skipped) of a file of text pairs; a row missing either
    text is skipped and counted."""
    examples, labels, skipped = [], [], 0
    for where, row in read_rows(path, setting):
        require_columns(where, row, [*columns, settings.label_column if labelled else None])
        if not all(filled(row[c]) for c in columns):
            skipped += 1
            continue
        examples.append(tuple(str(row[c]) for c in columns))
        labels.append(row_label(where, row, settings.label_column, settings.target == "score") if labelled else None)
    if not examples:
        raise UserError(f"{path} holds no rows with both texts")
    return examples, labels, skipped


# ---- entailment ---------------------------------------------------------------------------------------


@dataclass
class EntailmentConfig(LabeledConfig):
    """The [entailment] section of a config."""

    premise_column: str = "premise"
    hypothesis_column: str = "hypothesis"


class Entailment(Classification):
    Settings = EntailmentConfig
    added_tokens = SPECIAL
    noun = "pairs"

    @classmethod
    def read(cls, path, settings, setting, labelled=True):
        return read_pairs(path, settings, setting, (settings.premise_column, settings.hypothesis_column), labelled)

    @classmethod
    def texts(cls, example):
        return list(example)

    @classmethod
    def encode(cls, example, tok, block_size, settings):
        return [framed(tok, *example, block_size, settings.truncate)]

    @classmethod
    def describe(cls, example, settings) -> dict:
        return {settings.premise_column: example[0], settings.hypothesis_column: example[1]}


# ---- similarity ----------------------------------------------------------------------------------------


@dataclass
class SimilarityConfig(LabeledConfig):
    """The [similarity] section of a config."""

    text_a_column: str = "text_a"
    text_b_column: str = "text_b"


class Similarity(Entailment):
    Settings = SimilarityConfig

    @classmethod
    def read(cls, path, settings, setting, labelled=True):
        return read_pairs(path, settings, setting, (settings.text_a_column, settings.text_b_column), labelled)

    @classmethod
    def encode(cls, example, tok, block_size, settings):
        a, b = example
        return [framed(tok, a, b, block_size, settings.truncate), framed(tok, b, a, block_size, settings.truncate)]

    @classmethod
    def describe(cls, example, settings) -> dict:
        return {settings.text_a_column: example[0], settings.text_b_column: example[1]}


# ---- multiple choice -----------------------------------------------------------------------------------


@dataclass
class MultipleChoiceConfig(LabeledConfig):
    """The [multiple_choice] section of a config."""

    context_column: str = "ctx"  # HellaSwag's layout: ctx, endings, label
    choices_column: str = "endings"  # a JSON list, or numbered columns endings0, endings1, ...
    truncate: str = "tail"  # a long context keeps its end, next to the answers

    def __post_init__(self):
        require(self.target == "label", "target", '"label" (the right answer\'s index)', self.target)
        super().__post_init__()

    @property
    def chosen_metric(self) -> str:
        return self.best_metric or "accuracy"


class MultipleChoice(Classification):
    Settings = MultipleChoiceConfig
    added_tokens = SPECIAL
    combine = "choice"
    noun = "questions"

    @classmethod
    def read(cls, path, settings, setting, labelled=True):
        examples, labels, skipped = [], [], 0
        for where, row in read_rows(path, setting):
            require_columns(where, row, [settings.context_column, settings.label_column if labelled else None])
            choices = cls._choices(where, row, settings.choices_column)
            if examples and len(choices) != len(examples[0][1]):
                raise UserError(f"{where}: {len(choices)} answers where the rows before have {len(examples[0][1])}: "
                                f"every question needs the same number of answers")
            if not filled(row[settings.context_column]):
                skipped += 1
                continue
            examples.append((str(row[settings.context_column]), choices))
            if labelled:
                label = row_label(where, row, settings.label_column)
                if label not in [str(i) for i in range(len(choices))]:
                    raise UserError(f"{where}: label {excerpt(label)!r} is not the index of one of its {len(choices)} "
                                    f"answers (0 to {len(choices) - 1})")
                labels.append(label)
            else:
                labels.append(None)
        if not examples:
            raise UserError(f"{path} holds no rows with a context")
        return examples, labels, skipped

    @staticmethod
    def _choices(where: str, row: dict, column: str) -> list[str]:
        """A row's answers: a list in `column`, or the columns column0, column1, ..."""
        if isinstance(row.get(column), list):
            choices = row[column]
        elif f"{column}0" in row:
            choices = [row[f"{column}{i}"] for i in range(len(row)) if f"{column}{i}" in row]
        else:
            found = excerpt(", ".join(map(str, row)))
            raise UserError(f"{where}: no answers: a list in column {column!r} or columns {column}0, {column}1, ... "
                            f"(columns found: {found}): set multiple_choice.choices_column")
        if len(choices) < 2:
            raise UserError(f"{where}: {len(choices)} answer(s): a question needs two or more")
        for i, choice in enumerate(choices):
            if not filled(choice):
                raise UserError(f"{where}: answer {i} is empty: every answer needs text")
        return [str(c) for c in choices]

    @classmethod
    def texts(cls, example):
        return [example[0], *example[1]]

    @classmethod
    def encode(cls, example, tok, block_size, settings):
        context, choices = example
        return [framed(tok, context, choice, block_size, settings.truncate) for choice in choices]

    @classmethod
    def describe(cls, example, settings) -> dict:
        return {settings.context_column: example[0], settings.choices_column: example[1]}

    def label_names(self, examples, labels):
        return [str(i) for i in range(len(examples[0][1]))]

    def __init__(self, cfg, procs):
        super().__init__(cfg, procs)
        n = len(self.labels)
        for split, (examples, _) in self.raw.items():
            if len(examples[0][1]) != n:
                raise UserError(f"the {split} data has {len(examples[0][1])} answers per question, the training data {n}: "
                                f"use files with the same number")
