"""The GPT model: a decoder-only transformer in the shape of GPT-2.

Read top to bottom: GPTConfig (the hyperparameters), MLP, Block, and GPT, which
ties them together and adds the loss, parameter and FLOP counts and MFU; then
GPTClassifier (a GPT with a classification head) and pad_sequences (a batch of
token lists of different lengths and its attention mask). The attention layers
and the KV cache they keep between decoding steps are in gpt/attention.py.

The defaults are GPT-2 exactly. Switches in GPTConfig turn on the ideas that came
after it: other position encodings (gpt/positions.py explains each), RMSNorm,
post-norm blocks, local (windowed), sparse and grouped-query attention, other
attention mechanisms and scales, and the gated attention unit (gpt/attention.py).

This module knows nothing of training, files, tokenizers or other formats: it
is the network alone. Module and parameter names follow GPT-2
(transformer.h.0.attn.c_attn, ...), so converting to and from Hugging Face
checkpoints (gpt/hf.py, which builds on this module) is a transpose, not a
rename table.

Shapes in comments: B batch, T new tokens, S keys attended to (past + T),
C = n_embd, H = n_head, D = C // H, V = vocab_size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from gpt.attention import (ATTENTIONS, BLOCKS, GAU_KEY_DIM, LINEAR_CHUNK, PATTERNS, SCALES, SYNTHESIZERS, AttentionContext,
                           GatedAttentionUnit, KVCache, Linear, SynthesizerAttention, attention_layer, visible_by_pattern)
from gpt.errors import UserError
from gpt.positions import POSITIONS, alibi_slopes, rope_angles, sinusoidal
from gpt.system import device_peak_flops

NORMS = ("layernorm", "rmsnorm")
NORM_POSITIONS = ("pre", "post")


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest sequence the model reads (learned position embeddings)
    vocab_size: int = 50257  # ids the tokenizer produces; GPT-2's BPE has 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm layers, as in GPT-2
    # Embedding / LM-head rows are padded to a multiple of this (64 makes the head's
    # matmul noticeably faster on GPUs). Padded ids never reach callers. 1 turns it off.
    vocab_multiple: int = 64
    layer_norm_eps: float = 1e-5  # the epsilon of every norm layer (LayerNorm or RMSNorm)
    # -- the architecture switches (see the README's "Model" section); defaults are GPT-2 --
    position: str = "learned"  # "learned" | "sinusoidal" | "rope" | "alibi" | "none" (gpt/positions.py)
    rope_base: float = 10000.0  # RoPE: angle of dimension pair i is position * rope_base^(-2i/head_dim)
    norm: str = "layernorm"  # "layernorm" | "rmsnorm" (scale only: no mean, no bias)
    norm_position: str = "pre"  # "pre": x + f(norm(x)) (GPT-2); "post": norm(x + f(x)) (the 2017 Transformer)
    attention_window: int = 0  # > 0: each token attends to this many tokens: itself and the window - 1 before it
    n_kv_head: int = 0  # key/value heads, shared by groups of query heads; 0 = n_head (1 = multi-query)
    # sparse patterns (masks): "dense" | "dilated" (keys k, 2k, ... back) | "strided" (k recent + every k-th)
    attention_pattern: str = "dense"
    attention_stride: int = 0  # k of the sparse patterns
    attention: str = "softmax"  # | "linear" | "synthesizer_dense" | "synthesizer_random" | ... (gpt/attention.py)
    attention_scale: str = "sqrt_d"  # scores x 1/sqrt(head_dim) | "one" (unscaled) | "logn" (x log n / log block_size)
    block: str = "transformer"  # attention + MLP | "gau": one gated attention unit per layer

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "vocab_multiple"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise UserError(f"{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise UserError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}): "
                f"change one of them, e.g. n_head={math.gcd(self.n_embd, self.n_head)}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not self.layer_norm_eps > 0:
            raise UserError(f"layer_norm_eps must be positive, got {self.layer_norm_eps!r}")
        for name, allowed in (("position", POSITIONS), ("norm", NORMS), ("norm_position", NORM_POSITIONS),
                              ("attention", ATTENTIONS), ("attention_scale", SCALES),
                              ("attention_pattern", PATTERNS), ("block", BLOCKS)):
            if getattr(self, name) not in allowed:
                raise UserError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {getattr(self, name)!r}")
        self._check_mechanism()
        if self.position == "rope" and self.rope_dim % 2:
            raise UserError(f"position = 'rope' rotates pairs of dimensions, but the head dimension "
                            f"n_embd / n_head = {self.head_dim} is odd: make it even")
        if not self.rope_base > 1:  # frequencies base^(-2i/D) must fall from pair to pair; below 1 they grow
            raise UserError(f"rope_base must be greater than 1, got {self.rope_base!r}: at or below 1 RoPE's rotation "
                            f"frequencies do not fall from one dimension pair to the next (and overflow below 1); "
                            f"10000 is the usual base, 500000 one for long contexts")
        for name in ("attention_window", "n_kv_head"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise UserError(f"{name} must be a whole number >= 0 (0 = off), got {value!r}")
        if self.n_head % self.kv_heads:
            raise UserError(f"n_kv_head ({self.n_kv_head}) must divide n_head ({self.n_head}): each key/value "
                            f"head serves an equal group of query heads")

    def _check_mechanism(self) -> None:
        """The combinations of the attention switches that cannot work, each refused in one line."""
        stride = self.attention_stride
        if isinstance(stride, bool) or not isinstance(stride, int):
            raise UserError(f"attention_stride must be a whole number, got {stride!r}")
        if self.attention_pattern != "dense" and stride < 1:
            raise UserError(f"attention_pattern = {self.attention_pattern!r} needs attention_stride >= 1 (k: every "
                            f"k-th key), got {stride}")
        if self.attention_pattern == "dense" and stride:
            raise UserError(f"attention_stride = {stride} applies to attention_pattern = 'dilated' or 'strided' "
                            f"only: set one of them, or leave attention_stride at 0")
        what = "block = 'gau'" if self.block == "gau" else f"attention = {self.attention!r}"
        if self.block == "gau" or self.attention != "softmax":
            if self.block == "gau" and self.attention != "softmax":
                raise UserError(f"block = 'gau' brings its own attention (relu², one head): leave attention = "
                                f"'softmax', not {self.attention!r}")
            if self.n_kv_head and self.n_kv_head != self.n_head:
                raise UserError(f"n_kv_head shares the keys and values of softmax attention's heads; {what} has "
                                f"none to share: leave n_kv_head at 0")
            if self.position == "alibi":
                others = "'learned', 'sinusoidal', 'rope' or 'none'" if self.block == "gau" else "'learned', 'sinusoidal' or 'none'"
                raise UserError(f"position = 'alibi' biases softmax attention scores; {what} cannot take it: use "
                                f"position = {others}")
        if self.attention == "linear" or self.attention in SYNTHESIZERS and self.attention != "synthesizer_random+softmax":
            if self.position == "rope":
                raise UserError(f"position = 'rope' rotates queries and keys before their product, which "
                                f"{what} does not form that way: use position = 'learned', 'sinusoidal' or 'none'")
        if self.attention == "linear" and (self.attention_window or self.attention_pattern != "dense"):
            raise UserError("attention = 'linear' keeps one running sum of all earlier tokens: it cannot take an "
                            "attention_window or a sparse attention_pattern")
        scored = self.block == "transformer" and self.attention in ("softmax", "synthesizer_random+softmax")
        if self.attention_scale == "logn" and self.block_size < 2:
            raise UserError("attention_scale = 'logn' scales by log(n) / log(block_size): it needs block_size >= 2")
        if self.attention_scale != "sqrt_d" and not scored:
            raise UserError(f"attention_scale scales softmax attention's q·k; {what} has no such scores to scale: "
                            f"leave attention_scale = 'sqrt_d'")

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def attention_heads(self) -> int:
        """Heads of attention weights per layer: n_head, or the GAU's one."""
        return 1 if self.block == "gau" else self.n_head

    @property
    def rope_dim(self) -> int:
        """The width RoPE rotates: a head's, or the GAU's shared query/key width."""
        return GAU_KEY_DIM if self.block == "gau" else self.head_dim

    @property
    def extrapolates(self) -> bool:
        """Whether the model is defined at any length: not with learned positions, nor with a
        Synthesizer (its weights have a row or column per position up to block_size)."""
        return self.position != "learned" and self.attention not in SYNTHESIZERS

    @property
    def counts_keys(self) -> bool:
        """Whether attention needs the number of keys each query sees (log-n scaling, the GAU's 1/n)."""
        return self.attention_scale == "logn" or self.block == "gau"

    def parameter_count(self) -> int:
        """The parameters GPT(config) allocates (padded vocabulary included), without allocating.
        (A fixed Synthesizer's frozen matrix is a buffer, not a parameter: n_head x block_size².)"""
        C, b, H, N = self.n_embd, int(self.bias), self.n_head, self.block_size

        def linear(n_in, n_out):
            return n_in * n_out + n_out * b

        norm = C * (1 + b) if self.norm == "layernorm" else C
        if self.block == "gau":
            s = GAU_KEY_DIM
            block = norm + linear(C, 4 * C) + linear(C, s) + 4 * s + linear(2 * C, C)
        else:
            kv = 2 * self.kv_heads * self.head_dim
            attention = linear(C, C + kv) + linear(C, C)
            if self.attention in SYNTHESIZERS:
                mixed = self.attention == "synthesizer_random+softmax"
                attention = linear(C, 3 * C if mixed else C) + linear(C, C) + (H if mixed else 0)
                if self.attention == "synthesizer_dense":
                    attention += linear(C, C) + linear(C, H * N)
                elif self.attention != "synthesizer_random_fixed":
                    attention += H * N * N
            block = 2 * norm + attention + linear(C, 4 * C) + linear(4 * C, C)
        positions = N * C if self.position == "learned" else 0
        final_norm = norm if self.norm_position == "pre" else 0
        return self.padded_vocab_size * C + positions + self.n_layer * block + final_norm


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's "gelu_new"
        self.c_proj = Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


def norm_layer(config: GPTConfig) -> nn.Module:
    """LayerNorm (subtract the mean, divide by the standard deviation, scale and shift) or
    RMSNorm (Zhang & Sennrich 2019: divide by the root mean square and scale; cheaper, and
    in practice as good)."""
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, eps=config.layer_norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)


class Block(nn.Module):
    """A transformer block: attention, then an MLP, each added to the residual stream x.

    Pre-norm (GPT-2): x + attn(ln_1(x)), then x + mlp(ln_2(x)); the residual stream itself
    is never normalised, which keeps deep stacks easy to train.
    Post-norm (the 2017 Transformer): ln_1(x + attn(x)), then ln_2(x + mlp(x)); every
    block's output is normalised, and training usually needs a learning-rate warmup.
    A GAU layer (block = "gau") is the first half alone: its unit does both jobs.
    """

    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.post_norm = config.norm_position == "post"
        self.ln_1 = norm_layer(config)
        self.attn = attention_layer(config, layer)
        if config.block == "transformer":
            self.ln_2 = norm_layer(config)
            self.mlp = MLP(config)

    def forward(self, x, ctx: AttentionContext):
        if self.post_norm:
            x = self.ln_1(x + self.attn(x, ctx))
            return self.ln_2(x + self.mlp(x)) if hasattr(self, "mlp") else x
        x = x + self.attn(self.ln_1(x), ctx)
        return x + self.mlp(self.ln_2(x)) if hasattr(self, "mlp") else x


def forward_bytes(config: GPTConfig, batch: int, T: int, dtype: torch.dtype = torch.float32, *,
                  explicit: bool = False) -> int:
    """About the most memory, beyond the weights, that a forward pass without gradients
    (GPT.hidden_states) of `batch` sequences of T tokens holds at once, counted from what
    this module allocates (dtype: the autocast dtype, float32 without autocast):

    - the attention mask, where plain causal attention has none (an attention window or sparse
      pattern, ALiBi):
      GPT.attention_mask builds the (T, T) key distances (int64) and boolean masks, with ALiBi
      two (n_head, T, T) float32 biases, and keeps one; the fused kernel makes up to two copies
      of it in `dtype` per layer (a boolean mask as numbers, padded to an aligned length);
    - one block's activations: the residual stream, q, k, v, the MLP's 4 x n_embd: ~12 x B x T x C;
    - explicit=True (GPT.attention_probabilities, the explicit path of gpt.inspect): each layer's
      (B, n_head, T, T) float32 scores and probabilities, and those of every layer kept, then
      stacked: 8 x n_layer x B x n_head x T x T bytes at the end, plus the causal (T, T) mask;
    - a Synthesizer or GAU layer always forms its (B, heads, T, T) matrix: scores, weights and a
      temporary, float32, one layer at a time (linear attention's chunks are small).
    """
    square, elem = T * T, dtype.itemsize
    alibi = config.position == "alibi"
    if config.attention_window or alibi or config.attention_pattern != "dense":
        heads = config.n_head if alibi else 1
        built = 10 * square + (8 * heads * square if alibi else 0)  # distances, boolean masks, ALiBi biases
        kept = (4 * heads if alibi else 1) * square
        mask = max(built, kept + (0 if explicit else 2 * elem * heads * square))
    else:
        mask = 2 * square if explicit else 0  # the explicit path builds the causal mask; SDPA needs none
    activations = 12 * batch * T * config.n_embd * 4
    probabilities = 8 * config.n_layer * batch * config.n_head * square if explicit else 0
    if config.attention in SYNTHESIZERS or config.block == "gau":
        probabilities += 12 * batch * (1 if config.block == "gau" else config.n_head) * square
    return mask + activations + probabilities


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        C = config.n_embd
        layers = dict(wte=nn.Embedding(config.padded_vocab_size, C))
        if config.position == "learned":
            layers["wpe"] = nn.Embedding(config.block_size, C)
        layers["drop"] = nn.Dropout(config.dropout)
        layers["h"] = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        # post-norm blocks end normalised already; pre-norm needs a last norm before the head
        layers["ln_f"] = norm_layer(config) if config.norm_position == "pre" else nn.Identity()
        self.transformer = nn.ModuleDict(layers)
        self.lm_head = Linear(C, config.padded_vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied input/output embedding
        if config.position == "alibi":  # a constant, not a weight: kept out of the state_dict
            self.register_buffer("alibi_slopes", alibi_slopes(config.n_head), persistent=False)
        self.checkpoint_blocks = False  # activation checkpointing (set by gpt.parallel): recompute in backward
        self.reset_parameters()

    def reset_parameters(self):
        """GPT-2 initialisation: N(0, 0.02) weights, zero biases, and the residual output
        projections (c_proj: two per block, one per GAU layer) scaled down by 1/sqrt(2 * n_layer)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, (nn.LayerNorm, nn.RMSNorm, SynthesizerAttention, GatedAttentionUnit)):
                module.reset_parameters()  # a norm's ones (and zeros); R, or the GAU's scales and offsets
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * self.config.n_layer))
        with torch.no_grad():
            self.transformer.wte.weight[self.config.vocab_size :].zero_()  # padding rows: unused

    # ---- forward -------------------------------------------------------------------

    def forward(self, idx, targets=None, *, attention_mask=None, kv_cache: KVCache | None = None, prefix=None):
        """idx (B, T) token ids -> (logits, loss).

        With targets (B, T): logits (B, T, V) and the mean cross-entropy over targets != -1
        (0 if every target is -1). Targets must be < vocab_size; that is not checked here
        (it would cost a GPU sync per step): gpt.dataset checks the data's vocabulary.
        Without targets: only the last position's logits (B, 1, V), the cheap path for
        generation, and loss None. attention_mask, kv_cache and prefix are as in `hidden_states`.

        With vocabulary padding the logits are a view of a wider tensor: use
        .reshape, not .view, to flatten them.
        """
        h = self.hidden_states(idx, attention_mask=attention_mask, kv_cache=kv_cache, prefix=prefix)
        if targets is None:
            return self.logits(h[:, -1:]), None
        logits = self.lm_head(h)
        V = self.config.vocab_size
        if logits.size(-1) > V:
            # Padded ids get -inf: the softmax is exactly that of the real vocabulary,
            # without copying the logits to slice them. (No grad flows to these entries.)
            logits[..., V:] = float("-inf")
        targets = targets.flatten()
        loss = F.cross_entropy(logits.flatten(0, 1), targets, ignore_index=-1, reduction="sum")
        return logits[..., :V], loss / (targets != -1).sum().clamp(min=1)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """LM logits (..., V) from final hidden states; padded vocabulary ids never show."""
        return self.lm_head(h)[..., : self.config.vocab_size]

    def hidden_states(self, idx, *, attention_mask=None, kv_cache: KVCache | None = None, prefix=None):
        """Final hidden state (after the last LayerNorm) of every position: (B, T, C).

        attention_mask (B, T): 1 for real tokens, 0 for padding (left padding of a
        mixed-length batch). Padding is never attended to and does not advance the
        position ids, so each row gets the result it would get alone.
        kv_cache: the keys/values of earlier tokens; this call appends idx's.
        prefix: an int or (B,) ints: the tokens at positions below it see each other both ways
        (the prefix LM of UniLM / T5; at least T: BERT's bidirectional attention); later tokens
        stay causal. None: causal everywhere (GPT).
        """
        B, T = idx.shape
        if prefix is not None:
            self.check_bidirectional()
            prefix = torch.as_tensor(prefix, device=idx.device).reshape(-1)
        if attention_mask is not None and attention_mask.shape != idx.shape:
            raise UserError(f"attention_mask has shape {tuple(attention_mask.shape)}, idx {tuple(idx.shape)}: "
                            f"the mask covers the new tokens only (earlier ones are in the KV cache)")
        if kv_cache is not None and kv_cache.batch_size != B:
            raise UserError(f"the KV cache holds {kv_cache.batch_size} rows but idx has {B}: "
                            f"repeat or select the cache's rows to match")
        if kv_cache is None and self.max_context() is not None and T > self.max_context():
            raise UserError(
                f"sequence of {T} tokens is longer than the model's block_size ({self.config.block_size}): keep only "
                f"the last {self.config.block_size} tokens ({self.context_limit()} stop there; other schemes do not)"
            )
        real = None
        if attention_mask is not None and not bool(attention_mask.all()):
            real = attention_mask.to(device=idx.device, dtype=torch.bool)
        c = self.config
        plain = not c.attention_window and c.position != "alibi" and c.attention_pattern == "dense" and prefix is None
        if kv_cache is not None:
            past = kv_cache.length
            pos, slots = kv_cache.claim(T, real)
            # plain causal attention needs no mask on a fresh unpadded sequence, and a lone query sees every key
            causal = plain and not kv_cache.has_padding and not kv_cache.static and (past == 0 or T == 1)
            return self.decode(idx, pos, slots, kv_cache, causal=causal, prefix=prefix)
        slots = torch.arange(T, device=idx.device)
        pos = slots[None] if real is None else torch.where(real, real.cumsum(1) - 1, -1)
        return self.run(idx, self.attention_context(pos, pos, slots, causal=plain and real is None, prefix=prefix))

    def check_bidirectional(self) -> None:
        """Refuse what cannot attend both ways (prefix, masked-LM and bidirectional fine-tuning)."""
        if self.config.attention == "linear":
            raise UserError("attention = 'linear' keeps a running sum of the tokens before each one: it has no "
                            "bidirectional or prefix attention (lm.objective = mlm or prefix, or a backbone trained so)")

    def decode(self, idx, pos, slots, kv_cache: KVCache, causal: bool = False, prefix=None):
        """hidden_states on the cache, with the new tokens' position ids (B, T) and cache slots
        (T,) given (see KVCache.claim). Every shape is fixed by the cache and T, and nothing
        here reads a Python number that changes from step to step, so with a static cache it
        can be compiled once for all steps. causal: plain causal attention needs no mask."""
        ctx = self.attention_context(pos, kv_cache.pos[:, : kv_cache.span], slots, causal, kv_cache, prefix)
        return self.run(idx, ctx)

    def attention_context(self, pos, key_pos, slots, causal: bool, kv_cache: KVCache | None = None,
                          prefix=None) -> AttentionContext:
        """What every layer's attention reads in this pass (see AttentionContext): the mask (None
        where plain causal attention needs none), RoPE's angles, the keys each query sees."""
        c = self.config
        mask = None if causal else self.attention_mask(pos, key_pos, slots, prefix)
        rope = rope_angles(pos.clamp(min=0), c.rope_dim, c.rope_base) if c.position == "rope" else None
        ctx = AttentionContext(mask, pos, key_pos, slots, rope, kv_cache)
        if c.counts_keys:  # causal without a mask: query at position p sees p + 1 keys
            if mask is None:
                ctx.visible_keys = (pos + 1)[:, None, :, None].float()
            else:
                visible = mask[:, :1].isfinite() if mask.is_floating_point() else mask
                ctx.visible_keys = visible.sum(-1, keepdim=True).float()
        return ctx

    def run(self, idx, ctx: AttentionContext):
        """The network itself: embeddings, the blocks, the final norm."""
        x = self.transformer.drop(self.embed(idx, ctx.pos.clamp(min=0)))  # padding (-1) borrows position 0
        for block in self.transformer.h:
            if self.checkpoint_blocks and torch.is_grad_enabled():  # keep x only; recompute the block in backward
                x = torch.utils.checkpoint.checkpoint(block, x, ctx, use_reentrant=False)
            else:
                x = block(x, ctx)
        return self.transformer.ln_f(x)

    def embed(self, idx, pos):
        """Token embeddings, plus position vectors for the schemes that add them to the input
        (learned, sinusoidal); RoPE and ALiBi act inside attention instead, none nowhere."""
        x = self.transformer.wte(idx)
        if self.config.position == "learned":
            return x + self.transformer.wpe(pos)
        # √C scales the N(0, 0.02) token embeddings to std 0.02·√C (0.23 at C = 128, 0.55 at C = 768), still
        # below the sine table's RMS of 0.71; the paper paired √d with embeddings initialised at d^-1/2
        if self.config.position == "sinusoidal":
            return x * math.sqrt(self.config.n_embd) + sinusoidal(pos, self.config.n_embd).to(x.dtype)
        return x

    def attention_mask(self, q_pos, k_pos, slots, prefix=None):
        """What attention adds to its scores, from position ids: q_pos (B or 1, T) of the queries,
        k_pos (B or 1, S) of the keys, -1 for padding and empty cache slots, and slots (T,), the
        key slot holding each query itself. Returns a (B or 1, 1, T, S) boolean mask, True where
        a query may look, or with ALiBi a (B or 1, H, T, S) float bias, -inf where it may not.

        A query sees the real keys at earlier positions, and itself. Example, one row
        "_ _ a b c" left-padded to 5 (no cache): positions -1 -1 0 1 2; c's mask row is
        0 0 1 1 1; a pad's row holds only itself (no softmax row may be empty: NaN).
        An attention window of N also hides keys N or more positions behind the query, a sparse
        pattern keeps some distances only (gpt.attention.visible_by_pattern), and ALiBi's bias is
        -slope_h x (query position - key position) on what stays visible. With a prefix (B or 1,),
        real queries and keys at positions below it also see each other forwards (ALiBi: -slope x
        |distance|); the window and patterns apply after the prefix only.
        """
        distance = q_pos[:, :, None] - k_pos[:, None, :]  # (B or 1, T, S): how far back each key is
        real_key = k_pos[:, None, :] >= 0
        visible = real_key & (distance > 0) & visible_by_pattern(distance, self.config)
        if prefix is not None:
            within = (k_pos[:, None, :] < prefix[:, None, None]) & (q_pos[:, :, None] < prefix[:, None, None])
            visible = visible | (real_key & (q_pos[:, :, None] >= 0) & within)  # (B, T, S) when prefix is (B,)
        visible |= slots[:, None] == torch.arange(k_pos.size(-1), device=slots.device)  # itself
        if self.config.position == "alibi":
            bias = -self.alibi_slopes[:, None, None] * distance.abs()[:, None]  # (B or 1, H, T, S)
            return bias.masked_fill(~visible[:, None], float("-inf"))
        return visible[:, None]

    @torch.no_grad()
    def attention_probabilities(self, idx: torch.Tensor, attention_mask=None, prefix=None) -> torch.Tensor:
        """(n_layer, B, heads, T, T): how much each query position attends to each key, for every
        layer and head (config.attention_heads: n_head, one for the GAU), from the explicit
        attention path (for pictures; see attend_explicitly).
        attention_mask, prefix: as in hidden_states (padding gets no attention; prefix = T: every
        token sees every other, as a masked LM reads)."""
        layers = [block.attn for block in self.transformer.h]
        for attn in layers:
            attn.keep_probs = True
        try:
            self.hidden_states(idx, attention_mask=attention_mask, prefix=prefix)
            return torch.stack([attn.probs for attn in layers])
        finally:
            for attn in layers:
                attn.keep_probs, attn.probs = False, None

    def context_limit(self) -> str:
        """What stops this model at block_size, in words (where max_context() is not None)."""
        return "Synthesizer's position weights" if self.config.attention in SYNTHESIZERS else "learned position embeddings"

    def max_context(self) -> int | None:
        """The longest sequence this model can read at once: block_size, the length of its learned
        position table; None (no limit) for the position schemes defined at every length, for which
        block_size is only the training length."""
        return None if self.config.extrapolates else self.config.block_size

    def set_block_size(self, block_size: int) -> None:
        """Change the length the model trains at. Shorter: e.g. a GPT-2 checkpoint trained at 1024,
        used at 256 (the learned position table is cropped). Longer: only for position schemes
        that extrapolate, where block_size sizes nothing in the model (no weight, no buffer)."""
        old = self.config.block_size
        if block_size != old and self.config.attention in SYNTHESIZERS:
            raise UserError(f"block_size = {block_size}: a Synthesizer's weights have one row or column per position "
                            f"up to the block_size it was built with ({old}); keep block_size = {old}")
        if block_size > old and not self.config.extrapolates:
            raise UserError(f"block_size = {block_size} is longer than the {old} positions of the learned position "
                            f"embeddings, which cannot grow: use block_size <= {old}, or train a model whose "
                            f"positions extrapolate (position = rope, alibi, sinusoidal or none) from scratch")
        self.config = replace(self.config, block_size=block_size)  # checked again, like any GPTConfig
        if "wpe" in self.transformer:
            self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size].detach().clone())

    def grow_vocab(self, vocab_size: int) -> None:
        """Add token ids after the vocabulary (a tokenizer's added tokens: BERT's mask, GPT-1's
        start / delimiter / extract), each with a new N(0, 0.02) embedding, which is also its
        output row (tied). The padding rows are used first; past them the table is reallocated."""
        old, c = self.config.vocab_size, self.config
        if vocab_size < old:
            raise ValueError(f"grow_vocab({vocab_size}) would shrink the vocabulary of {old}")
        self.config = replace(c, vocab_size=vocab_size)
        weight = self.transformer.wte.weight
        if self.config.padded_vocab_size > weight.size(0):
            table = weight.new_zeros(self.config.padded_vocab_size, weight.size(1))
            table[: weight.size(0)] = weight.detach()
            weight = self.transformer.wte.weight = self.lm_head.weight = nn.Parameter(table)
            self.transformer.wte.num_embeddings = self.lm_head.out_features = table.size(0)
        with torch.no_grad():
            nn.init.normal_(weight[old:vocab_size], mean=0.0, std=0.02)

    def new_kv_cache(self, batch_size: int, dtype: torch.dtype | None = None, length: int | None = None,
                     spare: int = 0) -> KVCache:
        """An empty cache for `batch_size` rows on the model's device, in the model's dtype
        unless given (under bf16 autocast, dtype=torch.bfloat16 halves its memory), for `length`
        positions (default block_size; more only where max_context() allows), plus `spare` slots
        for tokens that share a position with another (contrastive search's candidates)."""
        limit = self.max_context()
        if length is not None and limit is not None and length > limit:
            raise UserError(f"a KV cache of {length} positions is longer than this model can read "
                            f"({self.context_limit()}, block_size = {limit})")
        w = self.transformer.wte.weight
        length = (length or self.config.block_size) + spare
        return KVCache(self.config, batch_size, length=length, device=w.device, dtype=dtype or w.dtype)

    # ---- size, FLOPs, utilisation ------------------------------------------------

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters, counted as Hugging Face does (tied weights once, no vocab padding).

        non_embedding=True leaves out the position embeddings, a lookup that costs no
        FLOPs; the token embedding stays because the tied LM head multiplies by it.
        """
        n = sum(p.numel() for p in self.parameters())
        n -= (self.config.padded_vocab_size - self.config.vocab_size) * self.config.n_embd
        if non_embedding and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward): 6N + 12·L·H·Q·T (PaLM, appendix B), with
        N = num_params(non_embedding=True), L layers, H heads of Q dimensions, T tokens of context.
        The second term is softmax attention's q·k and weights x v; the other mechanisms' version of
        it: a Synthesizer has the weights x v only (6·L·C·T), linear attention works within a chunk
        and on its D x D state (12·L·C·(chunk + D)), the GAU forms A from s-wide keys and multiplies
        2C-wide values (6·L·T·(s + 2C))."""
        cfg = self.config
        T, L, C = seq_len or cfg.block_size, cfg.n_layer, cfg.n_embd
        if cfg.block == "gau":
            attention = 6 * L * T * (GAU_KEY_DIM + 2 * C)
        elif cfg.attention == "linear":
            attention = 12 * L * C * (min(T, LINEAR_CHUNK) + cfg.head_dim)
        elif cfg.attention in SYNTHESIZERS and cfg.attention != "synthesizer_random+softmax":
            attention = 6 * L * C * T
        else:
            attention = 12 * L * cfg.n_head * cfg.head_dim * T
        return 6 * self.num_params(non_embedding=True) + attention

    def estimate_mfu(self, tokens_per_sec: float, device=None, seq_len: int | None = None):
        """Model FLOPs utilisation: achieved training FLOP/s over the device's dense bf16 peak.

        None where the peak is unknown (CPU, MPS, GPUs not in gpt.system.PEAK_BF16_FLOPS).
        """
        peak = device_peak_flops(device)
        if peak is None:
            return None
        return self.flops_per_token(seq_len) * tokens_per_sec / peak


class GPTClassifier(nn.Module):
    """A GPT backbone with a linear head on the final hidden state of each sequence's last real
    token (GPT-1; transformers' GPT2ForSequenceClassification).

    idx (B, L): one sequence per example, logits (B, n_out). idx (B, K, L): K sequences per
    example (GPT-1's input transformations), combined by `combine`:
        "sum"     their final states are added, then the head: (B, n_out) (similarity: both orders)
        "choice"  the head (n_out = 1) scores each sequence: (B, K), a softmax across candidates
                  (multiple choice)
    labels: class ids (cross-entropy), or float scores for a head with one output (mean squared
    error: a regression). Padding may be on either side: attention_mask marks the real tokens,
    and the result is the same. bidirectional: every real token sees every other (a backbone
    pretrained as a masked or prefix LM); else causal. lm_loss_weight > 0 adds GPT-1's auxiliary
    language-modelling loss on the same sequences (causal backbones only).
    """

    COMBINE = ("sum", "choice")

    def __init__(self, backbone: GPT, n_out: int, dropout: float = 0.1, combine: str = "sum",
                 bidirectional: bool = False):
        super().__init__()
        if combine not in self.COMBINE:
            raise ValueError(f"combine must be one of {self.COMBINE}, got {combine!r}")
        self.backbone, self.combine, self.bidirectional = backbone, combine, bidirectional
        self.dropout = nn.Dropout(dropout)
        # "choice": a bias would add the same to every answer's score, which the softmax cancels
        self.head = nn.Linear(backbone.config.n_embd, n_out, bias=combine == "sum")
        nn.init.normal_(self.head.weight, std=0.02)
        if self.head.bias is not None:
            nn.init.zeros_(self.head.bias)

    @property
    def config(self) -> GPTConfig:
        return self.backbone.config

    def forward(self, idx, attention_mask=None, labels=None, lm_loss_weight: float = 0.0):
        """-> (logits (B, n_out), or (B, K) for "choice"; loss or None)."""
        B, L = idx.size(0), idx.size(-1)
        idx = idx.reshape(-1, L)  # (B * K, L)
        mask = torch.ones_like(idx) if attention_mask is None else attention_mask.reshape(-1, L)
        h = self.backbone.hidden_states(idx, attention_mask=mask, prefix=L if self.bidirectional else None)
        # the last real token: the last column where the mask is 1
        last = mask.size(1) - 1 - mask.flip(1).argmax(dim=1)
        states = self.dropout(h[torch.arange(len(idx), device=idx.device), last]).view(B, -1, h.size(-1))
        # the head in its weights' dtype, outside autocast: fp32 in mixed precision (scores are not rounded to bf16)
        states = states.to(self.head.weight.dtype)
        with torch.autocast(idx.device.type, enabled=False):
            logits = self.head(states.sum(1)) if self.combine == "sum" else self.head(states)[..., 0]
        if labels is None:
            return logits, None
        if labels.is_floating_point():  # scores: a regression
            if logits.size(1) != 1 or self.combine != "sum":
                raise ValueError("float labels are scores: they need a head of one output and combine='sum'")
            loss = F.mse_loss(logits[:, 0].float(), labels.float())
        else:
            loss = F.cross_entropy(logits.float(), labels)
        if lm_loss_weight:
            if self.bidirectional:
                raise UserError("lm_loss_weight needs a causal backbone: this one sees every token both ways")
            real = mask.bool()
            targets = idx[:, 1:].masked_fill(~(real[:, 1:] & real[:, :-1]), -1)  # next token within the text
            lm_logits = self.backbone.logits(h[:, :-1]).float()
            loss = loss + lm_loss_weight * F.cross_entropy(
                lm_logits.reshape(-1, lm_logits.size(-1)), targets.reshape(-1), ignore_index=-1
            )
        return logits, loss


def pad_sequences(seqs: list[list[int]], pad_id: int = 0, left: bool = True, device=None):
    """Token lists of different lengths -> (B, longest) ids and the attention_mask that
    hidden_states/forward take (1 = token, 0 = padding). Left padding suits generation
    (every row's next token is in the last column); either side gives the same states."""
    width = max(len(s) for s in seqs)
    idx = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        if s:
            span = slice(width - len(s), width) if left else slice(0, len(s))
            idx[row, span], mask[row, span] = torch.as_tensor(s, dtype=torch.long), 1
    return idx.to(device), mask.to(device)
