"""Build the shipped downstream-task files in data/shakespeare/tasks/ from the held-out plays.

    python data/shakespeare/make_tasks.py          # rewrites data/shakespeare/tasks/*.jsonl (seed 0)

The texts are the two plays that the prepared corpus (data/shakespeare/char, byte,
gpt2: val_fraction 0.1, seed 0) puts in its validation split, Timon of Athens and
The Winter's Tale, so a model pretrained on the training split has never read them.
The script finds them the way gpt.prepare does, and refuses to run if that changes.

A speech is a speaker's line ("Hor.") followed by the lines of verse or prose up to
the next blank line; stage directions in brackets are dropped. From the speeches:

    next_line_*.jsonl    multiple choice in HellaSwag's layout {"ctx", "endings", "label"}:
                         ctx is the speaker and up to three lines of a speech, the endings are
                         the true next line and three lines drawn from other speeches (lines
                         that follow another in a speech, as the true one does), of similar
                         length (within 30%), in random order.
    follows_*.jsonl      entailment-style pairs {"premise", "hypothesis", "label"}: "next" when
                         the hypothesis is the line after the premise in the same speech,
                         "other" when it is a line of similar length from another speech (half each).
    same_speech_*.jsonl  similarity pairs {"text_a", "text_b", "label", "closeness"}: label "same"
                         when the two lines belong to one speech, "different" otherwise (half
                         each); closeness, a score for similarity.target = "score", is 1 / how
                         many lines apart they stand in their speech (1 for neighbours), 0 for
                         lines of different speeches.

Each is split into train / val / test by speech: every line of an item (the distractors too)
comes from the speeches of its split, so no line appears in two splits.
These measure what a small model learns about the form and flow of Shakespeare's verse,
not language understanding: line length, metre, rhyme, punctuation and topic all help.
"""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from gpt.prepare import documents, expand_inputs, work_items  # noqa: E402

HERE = Path(__file__).resolve().parent
HELD_OUT = ("timon_of_athens_gut.txt.xz", "winters_tale_gut.txt.xz")
SPLITS = {"train": 0.7, "val": 0.15, "test": 0.15}  # of the speeches
SIZES = {"next_line": 3000, "follows": 4000, "same_speech": 4000}  # items over all splits
SPEAKER = re.compile(r"^[A-Z][A-Za-z. ]{0,24}\.$")  # "Hor.", "First Lord.", "Leon."


def held_out_plays() -> list[str]:
    """The texts of the documents gpt.prepare puts in the validation split (val_fraction 0.1, seed 0)."""
    sources = expand_inputs([str(HERE / "texts")])
    texts, pieces = [], []
    for item_texts, ends, splits in work_items(documents(sources, "text"), 0.1, 0):
        for text, end, split in zip(item_texts, ends, splits):
            pieces.append(text)
            if end:
                texts.append(("".join(pieces), split))
                pieces = []
    val = [source.path.name for source, (_, split) in zip(sources, texts) if split == "val"]
    if tuple(val) != HELD_OUT:
        raise SystemExit(f"the validation split is now {val}, not {list(HELD_OUT)}: update HELD_OUT")
    return [text for text, split in texts if split == "val"]


def speeches(play: str) -> list[tuple[str, list[str]]]:
    """(speaker, lines) of each speech of at least two lines."""
    found = []
    for block in re.split(r"\n\s*\n", play):
        lines = [re.sub(r"\[.*?\]", "", line).strip() for line in block.splitlines()]
        lines = [line for line in lines if line]
        if len(lines) >= 3 and SPEAKER.match(lines[0]):
            found.append((lines[0], lines[1:]))
    return found


def similar(rng: random.Random, pool: list[str], line: str, avoid: set[str], count: int) -> list[str]:
    """`count` distinct lines of the pool within 30% of `line`'s length, none in `avoid`."""
    n = len(line)
    near = [p for p in pool if abs(len(p) - n) <= max(3, 0.3 * n) and p not in avoid]
    if len(near) < count:
        return []
    return rng.sample(near, count)


def main() -> None:
    rng = random.Random(0)
    all_speeches = [s for play in held_out_plays() for s in speeches(play)]
    rng.shuffle(all_speeches)
    bounds, start = {}, 0
    for split, fraction in SPLITS.items():
        end = start + round(fraction * len(all_speeches)) if split != "test" else len(all_speeches)
        bounds[split], start = all_speeches[start:end], end
    # lines that follow another in their speech, as the true ones do: the distractors come from the same
    # population (with first lines of speeches among them, the true line would be unlikely a priori)
    out = HERE / "tasks"
    out.mkdir(exist_ok=True)
    counts = {}
    for split, group in bounds.items():
        share = SPLITS[split]
        # every line of an item comes from this split's speeches: no line is in two splits. Distractors are
        # lines that follow another in their speech, as the true ones do (with first lines of speeches among
        # them, the true line would be unlikely a priori)
        pool = [line for _, lines in group for line in lines[1:] if len(line) >= 10]
        places = [(speaker, lines, i) for speaker, lines in group for i in range(1, len(lines)) if len(lines[i]) >= 10]
        rng.shuffle(places)
        next_line, follows, same = [], [], []
        for speaker, lines, i in places:
            if len(next_line) < SIZES["next_line"] * share:
                others = similar(rng, pool, lines[i], set(lines), 3)
                if others:
                    endings = [lines[i], *others]
                    rng.shuffle(endings)
                    ctx = "\n".join([speaker, *lines[max(0, i - 3) : i]]) + "\n"
                    next_line.append({"ctx": ctx, "endings": endings, "label": endings.index(lines[i])})
            if len(follows) < SIZES["follows"] * share:
                other = similar(rng, pool, lines[i], set(lines), 1)
                if other:
                    true = len(follows) % 2 == 0
                    follows.append({"premise": lines[i - 1], "hypothesis": lines[i] if true else other[0],
                                    "label": "next" if true else "other"})
            if len(same) < SIZES["same_speech"] * share:
                together = len(same) % 2 == 0
                partners = [line for line in lines[1:] if line != lines[i] and len(line) >= 10]  # the pool's kind
                if together and not partners:
                    continue
                text_b = rng.choice(partners) if together else rng.choice([p for p in pool if p not in lines])
                # 1 / how many lines apart in the speech (a line may stand twice: the nearer counts); 0 for two speeches
                apart = min((abs(j - i) for j, line in enumerate(lines) if line == text_b), default=0)
                closeness = round(1 / apart, 4) if together else 0.0
                same.append({"text_a": lines[i], "text_b": text_b, "label": "same" if together else "different",
                             "closeness": closeness})
        for name, items in (("next_line", next_line), ("follows", follows), ("same_speech", same)):
            rng.shuffle(items)
            path = out / f"{name}_{split}.jsonl"
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items), encoding="utf-8")
            tmp.replace(path)
            counts[path.name] = len(items)
    for name, n in counts.items():
        print(f"{n:6d}  {out.relative_to(ROOT) / name}")


if __name__ == "__main__":
    main()
