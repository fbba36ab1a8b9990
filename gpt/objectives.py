"""What a language model learns to predict from a window of text: GPT's, BERT's or the prefix LM's.

    causal   GPT: every token predicts the next from the tokens before it (causal attention).
    mlm      BERT's masked language model: 15% of the positions are chosen; of those, 80% are
             replaced by the mask token, 10% by a random token and 10% stay as they are; every
             token sees every other (bidirectional attention) and the loss is on the chosen
             positions only: predict the original token. It cannot generate left to right.
    prefix   the prefix LM of UniLM and T5: a random split point P per sequence; tokens
             before P see each other both ways, later ones stay causal, and the loss is on
             the next-token predictions of the suffix only (tokens P onwards).

`objective_batch` turns windows of block_size + 1 tokens into (inputs, targets, prefix) for
GPT.forward(inputs, targets, prefix=prefix); targets of -1 are not scored. Its randomness
comes from one key per window (the window's place in the sampler's stream, or a fixed one
for evaluation), never from a global generator: the same window gets the same masks on any
number of processes and after a resume.
"""

from __future__ import annotations

import numpy as np
import torch

OBJECTIVES = ("causal", "mlm", "prefix")
MASK = "mask"  # the added token of the masked LM (gpt.tokenizer.with_added)
MASK_FRACTION = 0.15
MASK_SPLIT = (0.8, 0.1, 0.1)  # of the chosen positions: mask token, random token, unchanged


def row_rng(seed: int, key: int) -> np.random.Generator:
    """The generator of one window: its masks and split point depend on (seed, key) alone."""
    return np.random.default_rng([seed, 20231, key])


def mask_tokens(tokens: torch.Tensor, real: torch.Tensor | None, keys, *, seed: int, mask_id: int,
                vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's corruption of (B, T) tokens: (inputs, targets). In each row, round(15%) of its real
    positions (at least one) are chosen; of them 80% get mask_id, 10% a random id below
    vocab_size (real tokens, not added ones), 10% keep their token. targets hold the original
    token at the chosen positions and -1 elsewhere. real (B, T) bool: False for padding, which
    is never chosen (None: all real). keys: one int per row (see row_rng)."""
    inputs, targets = tokens.clone(), torch.full_like(tokens, -1)
    for row, key in enumerate(keys):
        rng = row_rng(seed, int(key))
        where = np.arange(tokens.size(1)) if real is None else real[row].nonzero().flatten().numpy()
        if not len(where):
            continue
        chosen = torch.from_numpy(rng.choice(where, size=max(1, round(MASK_FRACTION * len(where))), replace=False))
        targets[row, chosen] = tokens[row, chosen]
        fate = torch.from_numpy(rng.random(len(chosen)))  # < 0.8: mask, < 0.9: random, else unchanged
        inputs[row, chosen[fate < MASK_SPLIT[0]]] = mask_id
        swapped = chosen[(fate >= MASK_SPLIT[0]) & (fate < MASK_SPLIT[0] + MASK_SPLIT[1])]
        inputs[row, swapped] = torch.from_numpy(rng.integers(0, vocab_size, len(swapped)))
    return inputs, targets


def prefix_split(T: int, keys, *, seed: int) -> torch.Tensor:
    """(B,) split points P, uniform in 1 .. T - 1: at least one token on either side."""
    return torch.tensor([row_rng(seed, int(key)).integers(1, T) for key in keys], dtype=torch.long)


def objective_batch(objective: str, windows: torch.Tensor, keys, *, seed: int, mask_id: int | None = None,
                    vocab_size: int | None = None) -> tuple[torch.Tensor, ...]:
    """Windows (B, T + 1) -> the arguments of GPT.forward: (inputs, targets) for causal,
    (inputs, targets, prefix) for mlm (prefix = T: all bidirectional) and prefix."""
    x, y = windows[:, :-1], windows[:, 1:]
    if objective == "causal":
        return x, y
    T = x.size(1)
    if objective == "mlm":  # the window's first T tokens, predicted in place (its last token is unused)
        inputs, targets = mask_tokens(x, None, keys, seed=seed, mask_id=mask_id, vocab_size=vocab_size)
        return inputs, targets, torch.full((len(x),), T, dtype=torch.long)
    if objective == "prefix":
        prefix = prefix_split(T, keys, seed=seed)
        # position t predicts token t + 1, and sees tokens up to P - 1 (all of them when t < P):
        # only predictions of tokens P onwards (positions t >= P - 1) are scored
        before = torch.arange(T)[None, :] < (prefix[:, None] - 1)
        return x, y.masked_fill(before, -1), prefix
    raise ValueError(f"unknown objective {objective!r}")
