"""Position encodings: how a transformer knows where each token is.

Attention alone is blind to order: permute the keys (with their values) and every
query's result is unchanged. So a GPT puts position information somewhere. The
schemes of GPTConfig.position, and where each one acts:

  learned     GPT-2: a trained vector per position, added to the token embeddings
              (model.py's `wpe` table). Nothing exists past block_size.
  sinusoidal  "Attention Is All You Need" (Vaswani et al. 2017): a fixed table of sines
              and cosines at geometrically spaced frequencies, added to the token
              embeddings (which are scaled by √C first, as in the paper). Defined at
              every position, but a model has only seen those it trained on.
  rope        RoFormer (Su et al. 2021): rotate queries and keys, pair of dimensions by
              pair, by angles proportional to the position, so that q·k depends on
              the two positions only through their distance.
  alibi       "Train Short, Test Long" (Press et al. 2022): no position vectors; each
              head subtracts slope × distance from its attention scores, a bias that
              prefers recent tokens and reads the same at every length.
  none        No positions (Haviv et al. 2022): the causal mask alone lets a model infer
              where it is (e.g. by counting how many tokens it can see).

This module holds the formulas, as plain functions of position ids; model.py
decides where they act.
"""

from __future__ import annotations

import math

import torch

POSITIONS = ("learned", "sinusoidal", "rope", "alibi", "none")


def sinusoidal(pos: torch.Tensor, dim: int, base: float = 10000.0) -> torch.Tensor:
    """Position ids (...) -> (..., dim) vectors: PE[p, 2i] = sin(p / base^(2i/dim)), PE[p, 2i+1] = cos(same)."""
    inv_freq = base ** (-torch.arange(0, dim, 2, device=pos.device, dtype=torch.float32) / dim)  # (ceil(dim/2),)
    angles = pos[..., None].float() * inv_freq
    return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(-2)[..., :dim]  # sin, cos interleaved


def rope_inverse_frequencies(head_dim: int, base: float, device=None) -> torch.Tensor:
    """base^(-2i/head_dim) for i < head_dim / 2, in float32: the angle each pair of dimensions turns
    by per position (GPTConfig checks that these and the angles of its positions are finite)."""
    return base ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)


def rope_angles(pos: torch.Tensor, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles p · base^(-2i/head_dim), i < head_dim / 2, shaped to
    broadcast against (B, H, T, head_dim / 2): (T, D/2) for (T,) positions, (B, 1, T, D/2) for (B, T)."""
    angles = pos[..., None].float() * rope_inverse_frequencies(head_dim, base, pos.device)
    if pos.dim() == 2:
        angles = angles[:, None]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, D): the first and second halves of D are the real and imaginary parts
    of D/2 complex numbers, and number i of position p is multiplied by e^(i·angle[p, i]).
    (The GPT-NeoX / Llama layout; the paper pairs neighbouring dimensions instead, which is the
    same function up to a fixed permutation of the weights.) Computed in float32."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


def alibi_slopes(n_head: int) -> torch.Tensor:
    """The paper's head slopes: for n a power of two, the geometric sequence 2^(-8/n), 2^(-16/n), ...,
    2^(-8); otherwise the slopes of the nearest smaller power of two, n0, followed by every other
    slope of 2·n0 heads (the paper's rule, so that slopes stay spread over the same range)."""

    def power_of_two(n: int) -> list[float]:
        return [2 ** (-8 * (i + 1) / n) for i in range(n)]

    n0 = 2 ** math.floor(math.log2(n_head))
    slopes = power_of_two(n0) + power_of_two(2 * n0)[0::2][: n_head - n0]
    return torch.tensor(slopes, dtype=torch.float32)
