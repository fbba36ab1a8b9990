"""Attention: how each token gathers information from the tokens before it.

Every layer here maps the (B, T, C) states of T new tokens to (B, T, C), reading an
AttentionContext: who may see whom (a mask built from position ids, or None for
plain causal attention), the RoPE angles, and the KV cache of earlier tokens.
The mechanisms of GPTConfig.attention:

  softmax      GPT-2: softmax(q kᵀ / √D) v per head (CausalSelfAttention), by PyTorch's
               fused kernels. attention_scale changes the 1/√D: "one" leaves the scores
               unscaled (their variance grows with D: Var(q·k) = D σ⁴ for unit entries,
               and the softmax saturates), "logn" multiplies them by log(n) / log(block_size),
               n the keys a query sees (Su 2021: the softmax's entropy then stays put as n
               grows past the training length).
  linear       Katharopoulos et al. 2020 (LinearAttention): the softmax's exp(q·k) replaced
               by φ(q)·φ(k) with φ(x) = elu(x) + 1 > 0, so that
                   y_t = φ(q_t)ᵀ S_t / φ(q_t)ᵀ z_t,  S_t = Σ_{j≤t} φ(k_j) v_jᵀ,  z_t = Σ_{j≤t} φ(k_j).
               Training computes it in chunks of 64 tokens (a T x T product within a chunk,
               the running sums S, z across chunks: linear in T); generation keeps only S and
               z per layer and head (the recurrent state) instead of a KV cache.
  synthesizer_dense         Tay et al. 2020 (SynthesizerAttention): no query-key product.
               Each token predicts its own row of attention logits over the block_size
               positions, relu(x W1 + b1) W2, from itself alone; causal by masking.
  synthesizer_random        the logits are a learned (n_head, block_size, block_size)
               matrix R, the same for every input: attention by position only.
  synthesizer_random_fixed  R random and frozen (N(0, 1), never trained).
  synthesizer_random+softmax  the paper's Random + Vanilla mixture: logits
               α R + (1 - α) q·k / √D with α = sigmoid(w), one learned w per head (from 0:
               an even mix at the start).
  A Synthesizer reads at most block_size positions (its R and W2 have that many). RoPE
  applies to the mixture's q·k only.

GPTConfig.block = "gau" replaces attention and MLP by one GatedAttentionUnit (Hua et al.
2022, FLASH): one head, relu² instead of softmax, and a gate; see its docstring.

GPTConfig.attention_pattern keeps some keys only (as masks, on full attention: they show
the idea but save no compute on this path): "dilated" keys at distances 0, k, 2k, ...,
"strided" the k most recent keys plus every k-th one before them (the Sparse
Transformer's strided pattern, both of its heads' patterns in one), k = attention_stride.

Also here: KVCache (what attention keeps between decoding steps) and Linear (nn.Linear,
with decoding's few-row products arranged for a CPU).

Shapes: B batch, T new tokens, S keys (past + T), C = n_embd, H = n_head, D = C // H.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt.errors import UserError
from gpt.positions import apply_rope

ATTENTIONS = ("softmax", "linear", "synthesizer_dense", "synthesizer_random", "synthesizer_random_fixed",
              "synthesizer_random+softmax")
SYNTHESIZERS = tuple(a for a in ATTENTIONS if a.startswith("synthesizer"))
BLOCKS = ("transformer", "gau")
SCALES = ("sqrt_d", "one", "logn")
PATTERNS = ("dense", "dilated", "strided")
GAU_KEY_DIM = 128  # s, the width of the GAU's shared query/key (the paper's choice)
LINEAR_CHUNK = 64  # tokens per chunk of linear attention's training computation


def cache_layout(config) -> tuple[int, int, int, bool]:
    """(heads, key width, value width, recurrent) of what each layer keeps between decoding steps:
    keys and values per token, or (linear attention) a recurrent state per head."""
    if config.block == "gau":
        return 1, GAU_KEY_DIM, 2 * config.n_embd, False
    if config.attention == "linear":
        return config.n_head, config.head_dim, config.head_dim, True
    if config.attention in ("synthesizer_dense", "synthesizer_random", "synthesizer_random_fixed"):
        return config.n_head, 0, config.head_dim, False  # values only: no keys to compare with
    return config.kv_heads, config.head_dim, config.head_dim, False


def visible_by_pattern(distance: torch.Tensor, config) -> torch.Tensor:
    """Which keys a query may see by how far back they are (distance >= 0 for earlier keys and
    itself): all, the attention_window most recent, or the sparse patterns (module docstring).
    With a window of N and a pattern, the pattern's keys stop at N of them: N x k positions back."""
    window, k = config.attention_window, config.attention_stride
    if config.attention_pattern == "dense":
        return distance < window if window else torch.ones_like(distance, dtype=torch.bool)
    every_kth = distance % k == 0
    if window:
        every_kth &= distance < window * k
    if config.attention_pattern == "dilated":
        return every_kth
    return every_kth | (distance < k)  # strided: the k most recent keys, then every k-th


@dataclass
class AttentionContext:
    """What every attention layer of one forward pass reads (GPT builds it once per pass).

    mask: (B or 1, 1, T, S) bool, True where a query may see a key, or with ALiBi a
    (B or 1, H, T, S) float bias, -inf where it may not; None: plain causal attention, no
    padding (query t sees keys 0..t of the last T + past slots).
    pos: (B or 1, T) position ids of the new tokens, -1 for padding; key_pos (B or 1, S) of the
    keys; slots (T,): the key slot of each new token. rope: RoPE's (cos, sin) or None.
    cache: the KV cache (decoding) or None. visible_keys: (B or 1, 1, T, 1), how many keys each
    query sees (for log-n scaling and the GAU's 1/n), or None where nothing needs it.
    """

    mask: torch.Tensor | None
    pos: torch.Tensor
    key_pos: torch.Tensor
    slots: torch.Tensor
    rope: tuple[torch.Tensor, torch.Tensor] | None = None
    cache: KVCache | None = None
    visible_keys: torch.Tensor | None = None

    def boolean_mask(self, T: int, S: int, device) -> torch.Tensor:
        """The mask as booleans (B or 1, 1, T, S): the causal triangle when mask is None."""
        if self.mask is None:
            return torch.ones(T, S, dtype=torch.bool, device=device).tril(S - T)[None, None]
        if self.mask.is_floating_point():
            return self.mask[:, :1].isfinite()
        return self.mask


class KVCache:
    """Keys and values of every layer for the tokens seen so far, preallocated to `length`
    slots (default block_size; models whose positions extrapolate may ask for more, and
    contrastive search adds spare slots for its candidates: GPT.new_kv_cache).
    With grouped-query attention it holds the n_kv_head key/value heads only; a Synthesizer
    keeps values only, the GAU its one shared key and its wide values (cache_layout), and
    linear attention no keys or values at all but its recurrent state: S (n_layer, B, H, D, D)
    and z (n_layer, B, H, D), whose size does not grow with the length.

    Every row has the same slots. `pos` (B, length) holds the position id of the token
    in each slot, -1 where a slot is empty or holds padding (the left padding of a
    mixed-length batch): attention reads the positions, so a query sees exactly the
    real tokens before it, and nothing in a row depends on the other rows' padding.
    `next_pos` (B,) is the position id of each row's next token (its count of real tokens).

    The cache never changes shape while decoding: `claim` reserves slots for new tokens
    and returns their positions and slot numbers as tensors, and `static = True` makes
    attention read all slots (empty ones are masked out), so one decoding step has the
    same shapes as the next and can be compiled once (see gpt.sampling).

    Rows can be repeated and selected (`repeat_rows`, `select_rows`: one prompt's cache
    for several samples; beams reordered), and contrastive search writes its candidates
    to spare slots and keeps the winner (`claim_candidates`, `keep_candidate`; linear
    attention holds each candidate's addition to the state aside until then).
    `KVCache.nbytes` tells the memory a cache takes before it is allocated.
    """

    def __init__(self, config, batch_size: int, *, length: int | None = None, device=None, dtype=torch.float32):
        length = length or config.block_size
        heads, key_dim, value_dim, recurrent = cache_layout(config)
        L = config.n_layer
        self.k = self.v = self.S = self.z = None
        if recurrent:
            self.S = torch.zeros(L, batch_size, heads, key_dim, value_dim, device=device, dtype=dtype)
            self.z = torch.zeros(L, batch_size, heads, key_dim, device=device, dtype=dtype)
            self.pending: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * L
        else:
            self.k = torch.zeros(L, batch_size, heads, length, key_dim, device=device, dtype=dtype)
            self.v = torch.zeros(L, batch_size, heads, length, value_dim, device=device, dtype=dtype)
        self.pos = torch.full((batch_size, length), -1, device=device, dtype=torch.long)
        self.next_pos = torch.zeros(batch_size, device=device, dtype=torch.long)
        self.length = 0  # slots in use (the same for every row)
        self.has_padding = False
        self.static = False  # attention reads every slot, not only those in use
        self.candidates = 0  # > 0 between claim_candidates and keep_candidate

    @staticmethod
    def nbytes(config, batch_size: int, length: int, dtype: torch.dtype = torch.float32) -> int:
        """Bytes that a cache of batch_size rows and length slots allocates: keys and values
        of every layer (or linear attention's state), and a position id (int64) per slot."""
        heads, key_dim, value_dim, recurrent = cache_layout(config)
        if recurrent:
            state = config.n_layer * heads * key_dim * (value_dim + 1) * dtype.itemsize
            return batch_size * (state + length * torch.int64.itemsize)
        keys_and_values = config.n_layer * heads * (key_dim + value_dim) * dtype.itemsize
        return batch_size * length * (keys_and_values + torch.int64.itemsize)

    def tensors(self) -> list[torch.Tensor]:
        """The tensors a decoding step reads and writes in place."""
        return [t for t in (self.k, self.v, self.S, self.z, self.pos) if t is not None]

    @property
    def batch_size(self) -> int:
        return self.pos.size(0)

    @property
    def capacity(self) -> int:
        return self.pos.size(1)

    @property
    def span(self) -> int:
        """How many slots attention reads."""
        return self.capacity if self.static else self.length

    def _reserve(self, T: int) -> tuple[int, torch.Tensor]:
        """The first of T free slots, and the T slot numbers as a tensor."""
        start = self.length
        if start + T > self.capacity:
            raise UserError(f"sequence of {start + T} tokens is longer than the model's block_size / the KV cache's "
                            f"{self.capacity} positions: keep only the last {self.capacity} tokens")
        self.length += T
        return start, torch.arange(start, start + T, device=self.pos.device)

    def claim(self, T: int, real: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Reserve the next T slots for new tokens; `real` (B, T) marks real tokens (False:
        padding). Returns their position ids (B, T), -1 for padding, and the slots (T,)."""
        start, slots = self._reserve(T)
        if real is None:
            pos = self.next_pos[:, None] + torch.arange(T, device=slots.device)
            self.next_pos += T
        else:
            pos = torch.where(real, self.next_pos[:, None] + real.cumsum(1) - 1, -1)
            self.next_pos += real.sum(1)
            self.has_padding = True
        self.pos[:, start : start + T] = pos
        return pos, slots

    def claim_candidates(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Reserve k slots for k candidates for each row's next token, all at the row's next
        position: each sees the row's tokens and itself, not the other candidates.
        -> positions (B, k), slots (k,)."""
        start, slots = self._reserve(k)
        pos = self.next_pos[:, None].expand(-1, k)
        self.pos[:, start : start + k] = pos
        self.candidates = k
        return pos, slots

    def keep_candidate(self, chosen: torch.Tensor) -> None:
        """After claim_candidates(k) and a forward: keep candidate chosen[b] of each row b in the
        first of the k slots (one key/value copy per layer and row) and free the others."""
        k = self.candidates
        start = self.length - k
        if self.S is not None:  # add the winner's feature-key x value to each layer's state
            index = chosen.view(-1, 1, 1, 1)
            for layer, (phi_k, v) in enumerate(self.pending):  # (B, H, k, D)
                phi_k, v = phi_k.take_along_dim(index, dim=2), v.take_along_dim(index, dim=2)
                self.S[layer] += (phi_k.transpose(-2, -1) @ v).to(self.S.dtype)
                self.z[layer] += phi_k[:, :, 0].to(self.z.dtype)
            self.pending = [None] * len(self.pending)
        else:
            index = chosen.view(1, -1, 1, 1, 1)
            for cache in (self.k, self.v):  # (L, B, H, S, D)
                cache[:, :, :, start : start + 1] = cache[:, :, :, start : start + k].take_along_dim(index, dim=3)
        self.pos[:, start + 1 : start + k] = -1
        self.length = start + 1
        self.next_pos += 1
        self.candidates = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor):
        """Store this step's (B, heads, T, width) keys/values of one layer in `slots`; return the
        keys/values of the slots attention reads, (B, heads, span, width)."""
        self.k[layer].index_copy_(2, slots, k.to(self.k.dtype))
        self.v[layer].index_copy_(2, slots, v.to(self.v.dtype))
        # read back in the compute dtype, so a bf16 cache also serves an fp32 model
        return self.k[layer, :, :, : self.span].to(k.dtype), self.v[layer, :, :, : self.span].to(v.dtype)

    def state(self, layer: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Linear attention: the running sums (S, z) of one layer over the tokens before this step."""
        return self.S[layer].to(dtype), self.z[layer].to(dtype)

    def add_to_state(self, layer: int, phi_k: torch.Tensor, v: torch.Tensor) -> None:
        """Linear attention: add this step's (B, H, T, D) feature keys (zero for padding) and values
        to one layer's state; candidates wait for keep_candidate, which adds the winner's."""
        if self.candidates:
            self.pending[layer] = (phi_k, v)
            return
        self.S[layer] += (phi_k.transpose(-2, -1) @ v).to(self.S.dtype)
        self.z[layer] += phi_k.sum(2).to(self.z.dtype)

    def select_rows(self, rows: torch.Tensor | list[int]):
        """Keep the given rows in the given order (repeats allowed): row i becomes old row rows[i].
        Only the slots in use are copied; with as many rows as before, in place (same storage)."""
        rows = torch.as_tensor(rows, device=self.pos.device, dtype=torch.long)
        n = self.length  # the rest is never read before it is written
        same = len(rows) == self.batch_size
        if self.S is not None:
            if same:
                self.S.copy_(self.S.index_select(1, rows))
                self.z.copy_(self.z.index_select(1, rows))
            else:
                self.S, self.z = self.S.index_select(1, rows), self.z.index_select(1, rows)
        elif same:
            self.k[:, :, :, :n] = self.k[:, :, :, :n].index_select(1, rows)
            self.v[:, :, :, :n] = self.v[:, :, :, :n].index_select(1, rows)
        else:
            # zeros, not empty: a static cache reads every slot, and 0 x NaN would leak through the mask
            k = self.k.new_zeros(self.k.size(0), len(rows), *self.k.shape[2:])
            v = self.v.new_zeros(self.v.size(0), len(rows), *self.v.shape[2:])
            torch.index_select(self.k[:, :, :, :n], 1, rows, out=k[:, :, :, :n])  # one copy, no temporary
            torch.index_select(self.v[:, :, :, :n], 1, rows, out=v[:, :, :, :n])
            self.k, self.v = k, v
        if same:
            self.pos.copy_(self.pos[rows])
            self.next_pos.copy_(self.next_pos[rows])
        else:
            self.pos, self.next_pos = self.pos[rows], self.next_pos[rows]

    def repeat_rows(self, n: int):
        """Each row n times in a row: [a, b] -> [a, a, b, b] for n=2 (like repeat_interleave)."""
        self.select_rows(torch.arange(self.batch_size, device=self.pos.device).repeat_interleave(n))


class Linear(nn.Linear):
    """nn.Linear, with the product of a decoding step on a CPU arranged to use every core.

    Generating one token reads every weight once for a handful of rows, so its speed is
    how fast the weights stream from memory. For one row, the CPU BLAS (MKL) computes
    x Wᵀ as a matrix-vector product on a single core; computed as W xᵀ with two or more
    columns, the same numbers take the multi-threaded matrix-product path, 2-3x faster
    on a 2-core machine (benchmarks/RESULTS.md, "Generation"). So on a CPU, 1 to 4
    rows go that way (one row is doubled); everything else is nn.Linear's F.linear.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.size(-1)
        if not x.is_cpu or rows > 4:
            return F.linear(x, self.weight, self.bias)
        x2 = x.reshape(rows, -1)
        y = self.weight @ (torch.cat([x2, x2]) if rows == 1 else x2).t()  # (out, 2 or rows)
        y = y[:, :rows].t()
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)  # under autocast y is bf16, like F.linear's output
        return y.contiguous().view(*x.shape[:-1], -1)  # row-major, as attention kernels want


def heads(t: torch.Tensor, n: int) -> torch.Tensor:
    """(B, T, n x D) -> (B, n, T, D)."""
    B, T, _ = t.shape
    return t.view(B, T, n, -1).transpose(1, 2)


def logn_factor(ctx: AttentionContext, block_size: int) -> torch.Tensor:
    """log(n) / log(block_size) per query, n the keys it sees: 1 at the training length."""
    return ctx.visible_keys.log() / math.log(block_size)


def masked_softmax(scores: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """softmax over the visible keys (every row has at least one: itself)."""
    return scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention (softmax; GPT-2). With n_kv_head < n_head (grouped-query
    attention), each key/value head is shared by n_head / n_kv_head query heads: fewer keys and
    values to compute and, above all, to keep in the KV cache while decoding."""

    def __init__(self, config, layer: int):
        super().__init__()
        self.layer = layer  # index into the KV cache
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        self.dropout = config.dropout
        self.scale, self.block_size = config.attention_scale, config.block_size
        kv = 2 * self.n_kv_head * self.head_dim
        self.c_attn = Linear(config.n_embd, config.n_embd + kv, bias=config.bias)  # fused q, k, v
        self.c_proj = Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.keep_probs = False  # inspection: compute attention explicitly and keep the probabilities
        self.probs: torch.Tensor | None = None  # (B, H, T, S), when keep_probs

    def forward(self, x, ctx: AttentionContext):
        """x (B, T, C). The cache stores keys after rotation, so they are rotated once."""
        B, T, C = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.c_attn(x).split([C, Hkv * D, Hkv * D], dim=-1)
        q, k, v = heads(q, H), heads(k, Hkv), heads(v, Hkv)
        if ctx.rope is not None:
            q, k = apply_rope(q, *ctx.rope), apply_rope(k, *ctx.rope)
        if ctx.cache is not None:
            k, v = ctx.cache.update(self.layer, k, v, ctx.slots)  # (B, Hkv, S, D)
        if Hkv != H:  # each key/value head serves H / Hkv consecutive query heads
            k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
        if self.scale == "logn":
            q = q * logn_factor(ctx, self.block_size).to(q.dtype)
        y = self.attend(q, k, v, ctx.mask)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_dropout(self.c_proj(y))

    def score_scale(self) -> float:
        return 1.0 if self.scale == "one" else 1 / math.sqrt(self.head_dim)

    def attend(self, q, k, v, attn_mask):
        """softmax(q kᵀ / √D + mask) v, by PyTorch's fused kernels (flash / memory-efficient on GPU).

        attn_mask None means plain causal attention; else a boolean mask (True = may attend)
        or, with ALiBi, a float bias added to the scores (-inf = may not attend).
        """
        if self.keep_probs:
            return self.attend_explicitly(q, k, v, attn_mask)
        if attn_mask is not None and attn_mask.is_floating_point():
            attn_mask = attn_mask.to(q.dtype)  # the fused kernels want the bias in q's dtype (bf16 under autocast)
        return F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=attn_mask is None and q.size(2) > 1,
            scale=self.score_scale(),
        )

    def attend_explicitly(self, q, k, v, attn_mask):
        """The same attention written out, step by step, keeping the probabilities in self.probs.
        Slow and memory-hungry (it materialises the (T, S) matrix): for inspection only."""
        T, S = q.size(-2), k.size(-2)
        scores = q @ k.transpose(-2, -1) * self.score_scale()  # (B, H, T, S)
        if attn_mask is None:  # causal: query t sees keys up to its own position (S - T + t)
            attn_mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        if attn_mask.is_floating_point():
            scores = scores + attn_mask
        else:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        probs = scores.softmax(dim=-1)
        self.probs = probs.detach()
        return F.dropout(probs, self.dropout, self.training) @ v


class LinearAttention(nn.Module):
    """Linear attention (Katharopoulos et al. 2020; the module docstring has the formula), with
    GPT-2's projections (c_attn, c_proj) and n_head heads of D dimensions.

    One function serves training, evaluation and decoding: `chunks` walks the new tokens in
    chunks; within a chunk the weights φ(q_t)·φ(k_j) of the visible pairs are an explicit
    (chunk x chunk) product, and everything before the chunk is the running state (S, z).
    Without a cache the state starts at zero; with one it starts from the cache's and the
    new tokens are added to it. Padding (position -1) never enters the state."""

    def __init__(self, config, layer: int):
        super().__init__()
        self.layer, self.n_head = layer, config.n_head
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.keep_probs = False
        self.probs: torch.Tensor | None = None  # the effective weights φ(q)·φ(k) / normaliser

    @staticmethod
    def feature(x: torch.Tensor) -> torch.Tensor:
        """φ(x) = elu(x) + 1: x + 1 for x > 0, exp(x) below (positive everywhere)."""
        return torch.where(x > 0, x + 1, x.clamp(max=0).exp())

    def forward(self, x, ctx: AttentionContext):
        B, T, C = x.shape
        # in float32 whatever the autocast dtype: elu(x) + 1 for negative x is exp(x) - 1 + 1, which
        # bf16 rounds to 0 (a zero normaliser), and the running sums add up many small terms
        q, k, v = (heads(t, self.n_head).float() for t in self.c_attn(x).split(C, dim=-1))
        phi_q, phi_k = self.feature(q), self.feature(k)
        real = (ctx.pos >= 0)[:, None, :, None].float()  # (B or 1, 1, T, 1)
        state = ctx.cache.state(self.layer, torch.float32) if ctx.cache is not None else None
        visible = ctx.boolean_mask(T, T, x.device) if ctx.mask is None else ctx.mask[..., ctx.slots]
        y = self.chunks(phi_q, phi_k, v, visible, real, state)
        if ctx.cache is not None:
            ctx.cache.add_to_state(self.layer, phi_k * real, v)
        if self.keep_probs:
            weights = (phi_q @ phi_k.transpose(-2, -1)) * visible
            self.probs = (weights / weights.sum(-1, keepdim=True)).detach()
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, C).to(x.dtype)))

    @staticmethod
    def chunks(phi_q, phi_k, v, visible, real, state=None, chunk: int = LINEAR_CHUNK):
        """phi_q, phi_k, v (B, H, T, D); visible (B or 1, 1, T, T) among these tokens; real
        (B or 1, 1, T, 1): 1 for keys that enter the state; state (S, z) of earlier tokens.
        -> (B, H, T, D): y_t = (φq_t S + Σ_visible w_tj v_j) / (φq_t z + Σ_visible w_tj)."""
        B, H, T, D = phi_q.shape
        S, z = state if state is not None else (phi_q.new_zeros(B, H, D, D), phi_q.new_zeros(B, H, D))
        out = []
        for a in range(0, T, chunk):
            q, k, vc, r = phi_q[:, :, a : a + chunk], phi_k[:, :, a : a + chunk], v[:, :, a : a + chunk], real[:, :, a : a + chunk]
            w = (q @ k.transpose(-2, -1)) * visible[..., a : a + chunk, a : a + chunk]
            numerator = q @ S + w @ vc
            denominator = q @ z[..., None] + w.sum(-1, keepdim=True)
            out.append(numerator / denominator)
            S, z = S + (k * r).transpose(-2, -1) @ vc, z + (k * r).sum(2)
        return torch.cat(out, dim=2)


class SynthesizerAttention(nn.Module):
    """Synthesizer attention (Tay et al. 2020; the module docstring has the variants). Values
    (and for the mixture queries and keys) come from c_attn, the output from c_proj, as in
    GPT-2; the synthetic logits are indexed by position ids, so padding and the cache work as
    for softmax attention. Initialisation: W1, W2 and a learned R as every GPT-2 weight,
    N(0, 0.02) (R then starts near uniform attention over the visible keys); a fixed R N(0, 1)
    (at 0.02 it would be uniform averaging, not a random pattern)."""

    def __init__(self, config, layer: int):
        super().__init__()
        self.layer, self.kind = layer, config.attention
        self.n_head, self.head_dim, self.block_size = config.n_head, config.head_dim, config.block_size
        self.dropout, self.scale = config.dropout, config.attention_scale
        C, H, N = config.n_embd, config.n_head, config.block_size
        self.mixed = self.kind == "synthesizer_random+softmax"
        self.c_attn = Linear(C, 3 * C if self.mixed else C, bias=config.bias)  # (q, k,) v
        if self.kind == "synthesizer_dense":
            self.c_dense = Linear(C, C, bias=config.bias)  # W1, b1
            self.c_logits = Linear(C, H * N, bias=config.bias)  # W2: a logit per head and key position
        elif self.kind == "synthesizer_random_fixed":
            self.register_buffer("random", torch.empty(H, N, N))  # saved with the weights, never trained
        else:
            self.random = nn.Parameter(torch.empty(H, N, N))
        if self.mixed:
            self.mix = nn.Parameter(torch.zeros(H))  # alpha = sigmoid(mix): 0.5 at the start
        self.c_proj = Linear(C, C, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.keep_probs = False
        self.probs: torch.Tensor | None = None
        self.reset_parameters()

    def reset_parameters(self):
        if hasattr(self, "random"):
            nn.init.normal_(self.random, std=1.0 if self.kind == "synthesizer_random_fixed" else 0.02)
        if self.mixed:
            nn.init.zeros_(self.mix)

    def forward(self, x, ctx: AttentionContext):
        B, T, C = x.shape
        H, D = self.n_head, self.head_dim
        qp, kp = ctx.pos.clamp(min=0), ctx.key_pos.clamp(min=0)  # padding borrows position 0 (masked)
        if self.mixed:
            q, k, v = (heads(t, H) for t in self.c_attn(x).split(C, dim=-1))
            if ctx.rope is not None:
                q, k = apply_rope(q, *ctx.rope), apply_rope(k, *ctx.rope)
        else:
            v = heads(self.c_attn(x), H)
            k = v.new_empty(B, H, T, 0)  # nothing to compare with: the cache keeps values only
        if ctx.cache is not None:
            k, v = ctx.cache.update(self.layer, k, v, ctx.slots)
        S = v.size(2)
        if self.kind == "synthesizer_dense":  # each query's own logits, read at the keys' positions
            logits = self.c_logits(F.relu(self.c_dense(x))).view(B, T, H, self.block_size).transpose(1, 2)
            scores = logits.take_along_dim(kp[:, None, None, :].expand(B, H, T, S), dim=-1)
        else:  # R[h, query position, key position]
            scores = self.random[:, qp[:, :, None], kp[:, None, :]].transpose(0, 1).to(v.dtype)  # (B or 1, H, T, S)
        if self.mixed:
            scale = 1.0 if self.scale == "one" else 1 / math.sqrt(D)
            if self.scale == "logn":
                q = q * logn_factor(ctx, self.block_size).to(q.dtype)
            alpha = torch.sigmoid(self.mix)[:, None, None].to(q.dtype)
            scores = alpha * scores + (1 - alpha) * (q @ k.transpose(-2, -1)) * scale
        probs = masked_softmax(scores.float(), ctx.boolean_mask(T, S, x.device)).to(v.dtype)
        if self.keep_probs:
            self.probs = probs.detach()
        y = F.dropout(probs, self.dropout, self.training) @ v
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, C)))


class GatedAttentionUnit(nn.Module):
    """The gated attention unit (Hua et al. 2022, "Transformer Quality in Linear Time"), which
    takes the place of both attention and MLP in a layer (so a GAU model stacks about twice as
    many layers for the same parameters). With d = n_embd, e = 2d and s = 128 (the paper's):

        U = φ(X W_u), V = φ(X W_v)   (T, e)      φ = SiLU (Swish), as in the paper
        Z = φ(X W_z)                  (T, s)      one shared, narrow representation
        Q = Z γ_q + β_q, K = Z γ_k + β_k          per-dimension scale and offset (γ normal, std 1; β = 0)
        A = relu²(Q Kᵀ / √s) / n                  n = the keys each query sees; causal by masking
        O = (U ⊙ A V) W_o

    One head; relu² where the softmax was (rows of A do not sum to 1). Choices of ours where the
    paper differs: the paper scales by 1/n only (with its relative position bias), we divide the
    scores by √s as well; positions are the model's (RoPE rotates Q and K over the s dimensions),
    no T5 relative bias; W_u and W_v are one matrix (c_uv), biases as config.bias says; and γ
    starts normal with std 1, not the paper's std 0.02: from 0.02, A starts at ~1e-8 of its scale
    and its gradients shrink with γ³, so in short runs attention barely wakes (Shakespeare char,
    7 GAU layers, 400 steps: val loss 3.00 from std 0.02, 2.48 from std 1, 2.48 from ones, 2.47
    from std 2; benchmarks/RESULTS.md). γ and β are vectors: no weight decay."""

    def __init__(self, config, layer: int):
        super().__init__()
        self.layer = layer
        C, s = config.n_embd, GAU_KEY_DIM
        self.c_uv = Linear(C, 4 * C, bias=config.bias)  # U and V, e = 2C each
        self.c_z = Linear(C, s, bias=config.bias)
        # per-dimension scales and offsets (vectors, like a norm's: no weight decay)
        self.gamma_q, self.gamma_k = nn.Parameter(torch.empty(s)), nn.Parameter(torch.empty(s))
        self.beta_q, self.beta_k = nn.Parameter(torch.zeros(s)), nn.Parameter(torch.zeros(s))
        self.c_proj = Linear(2 * C, C, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.keep_probs = False
        self.probs: torch.Tensor | None = None  # A, (B, 1, T, S)
        self.reset_parameters()

    def reset_parameters(self):
        for gamma in (self.gamma_q, self.gamma_k):
            nn.init.normal_(gamma, std=1.0)
        for beta in (self.beta_q, self.beta_k):
            nn.init.zeros_(beta)

    def forward(self, x, ctx: AttentionContext):
        u, v = F.silu(self.c_uv(x)).chunk(2, dim=-1)  # (B, T, e) each
        z = F.silu(self.c_z(x))  # (B, T, s)
        q, k = (z * self.gamma_q + self.beta_q)[:, None], (z * self.gamma_k + self.beta_k)[:, None]  # (B, 1, T, s)
        if ctx.rope is not None:
            q, k = apply_rope(q, *ctx.rope), apply_rope(k, *ctx.rope)
        v = v[:, None]  # (B, 1, T, e)
        if ctx.cache is not None:
            k, v = ctx.cache.update(self.layer, k, v, ctx.slots)
        T, S = q.size(2), k.size(2)
        scores = q @ k.transpose(-2, -1) / math.sqrt(GAU_KEY_DIM)
        a = F.relu(scores).square() * ctx.boolean_mask(T, S, x.device) / ctx.visible_keys.to(scores.dtype)
        if self.keep_probs:
            self.probs = a.detach()
        o = u * (a @ v)[:, 0]
        return self.resid_dropout(self.c_proj(o))


def attention_layer(config, layer: int) -> nn.Module:
    """The attention module of one layer, as config.block and config.attention say."""
    if config.block == "gau":
        return GatedAttentionUnit(config, layer)
    if config.attention == "linear":
        return LinearAttention(config, layer)
    if config.attention in SYNTHESIZERS:
        return SynthesizerAttention(config, layer)
    return CausalSelfAttention(config, layer)
