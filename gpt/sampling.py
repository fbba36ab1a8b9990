"""Text generation: logits processors and decoding loops, all on the KV cache.

    from gpt.sampling import SamplingConfig, generate, stream
    out = generate(model, idx, 100, temperature=0.8, top_k=200)        # (B, T + 100) token ids
    out = generate(model, idx, 100, SamplingConfig(temperature=0.8, top_k=200))   # the same
    out = generate(model, idx, 100, temperature=0)                      # greedy
    out = generate(model, idx, 100, penalty_alpha=0.6, top_k=4)         # contrastive search
    for tokens in stream(model, idx, 100, top_p=0.9): ...               # (B,) new tokens per step

Logits processors change the next-token scores before a choice is made. They
follow Hugging Face transformers exactly (same thresholds, same tie handling,
same -inf filter value) and apply in its order: repetition penalty, then, when
sampling, temperature, top-k, top-p, min-p.

Decoding loops: sampling (torch.multinomial, reproducible with a
torch.Generator), greedy (temperature=0) and contrastive search (penalty_alpha
> 0, top_k > 1; Su et al. 2022, with transformers' semantics). Every loop
prefills the prompt once and then runs one single-token forward per new token
on the KV cache; contrastive search runs its top_k candidates as one batched
forward (cache rows repeated) and keeps the winner's rows.

Batches: prompts of different lengths are left-padded, with an attention_mask
(1 = token, 0 = padding; see `pad_sequences`); num_samples repeats each prompt's
cache after one prefill. A row stops at eos_token_id (later positions repeat it).
A model with learned positions reads at most block_size tokens: past that, the
context slides (the cache is rebuilt from the last block_size - 1 tokens of each
row). Models whose positions extrapolate (GPT.max_context() is None) keep every
token: their cache is sized to the prompt plus max_new_tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F

from gpt.errors import UserError
from gpt.model import GPT, KVCache, pad_sequences  # noqa: F401 (pad_sequences: for callers)

# ---- logits processors ------------------------------------------------------------------
# Each maps (tokens so far (B, S), scores (B, V)) to new scores (B, V).


class RepetitionPenalty:
    """Scores of tokens already in the row: divided by `penalty` if positive, multiplied if negative."""

    def __init__(self, penalty: float):
        self.penalty = penalty

    def __call__(self, tokens: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        seen = torch.gather(scores, 1, tokens)
        seen = torch.where(seen < 0, seen * self.penalty, seen / self.penalty)
        return scores.scatter(1, tokens, seen)


class Temperature:
    def __init__(self, temperature: float):
        self.temperature = temperature

    def __call__(self, tokens: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores / self.temperature


class TopK:
    """Keep the k highest scores (and any tied with the k-th); the rest become -inf."""

    def __init__(self, k: int):
        self.k = k

    def __call__(self, tokens: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        kth = torch.topk(scores, min(self.k, scores.size(-1)))[0][..., -1, None]
        return scores.masked_fill(scores < kth, float("-inf"))


class TopP:
    """Nucleus: keep the smallest set of top tokens whose probability reaches p (at least one)."""

    def __init__(self, p: float):
        self.p = p

    def __call__(self, tokens: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        sorted_scores, order = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - self.p)  # the low tail whose mass stays within 1 - p
        remove[..., -1:] = False
        return scores.masked_fill(remove.scatter(1, order, remove), float("-inf"))


class MinP:
    """Keep tokens whose probability is at least p times the most likely token's (at least one)."""

    def __init__(self, p: float):
        self.p = p

    def __call__(self, tokens: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(scores, dim=-1)
        remove = probs < self.p * probs.max(dim=-1, keepdim=True)[0]
        order = torch.argsort(scores, descending=True, dim=-1)
        sorted_remove = torch.gather(remove, 1, order)
        sorted_remove[..., :1] = False
        return scores.masked_fill(sorted_remove.scatter(1, order, sorted_remove), float("-inf"))


# ---- the decoding settings ----------------------------------------------------------------


def _setting(default, kind: type, help: str):
    """A field with what a command line needs to offer it: its value type and a help text."""
    return field(default=default, metadata={"type": kind, "help": help})


@dataclass(frozen=True)
class SamplingConfig:
    """How each next token is chosen. Declared once here: generate(), stream() and sample.py's
    options are these fields (sample.py builds its command line from them)."""

    temperature: float = _setting(1.0, float, "scale of the scores before sampling; 0 = greedy")
    top_k: int | None = _setting(None, int, "keep the k likeliest tokens (default: all); with penalty_alpha, "
                                            "the number of candidates of contrastive search")
    top_p: float | None = _setting(None, float, "nucleus sampling threshold, in (0, 1]")
    min_p: float | None = _setting(None, float, "keep tokens with at least min_p x the top probability")
    repetition_penalty: float = _setting(1.0, float, "> 1 discourages repeats (1 = off)")
    penalty_alpha: float | None = _setting(None, float, "contrastive search degeneration penalty, in [0, 1]")

    def __post_init__(self):
        """Reject settings that have no meaning, with the name and the allowed range."""
        checks = [
            (self.temperature >= 0, "temperature must be >= 0 (0 = greedy)", self.temperature),
            (self.top_k is None or self.top_k >= 1, "top_k must be >= 1", self.top_k),
            (self.top_p is None or 0 < self.top_p <= 1, "top_p must be in (0, 1]", self.top_p),
            (self.min_p is None or 0 <= self.min_p <= 1, "min_p must be in [0, 1]", self.min_p),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0 (1 = off)", self.repetition_penalty),
            (self.penalty_alpha is None or 0 <= self.penalty_alpha <= 1, "penalty_alpha must be in [0, 1]",
             self.penalty_alpha),
        ]
        for ok, message, value in checks:
            if not ok:
                raise UserError(f"{message}, got {value}")

    @property
    def contrastive(self) -> bool:
        return bool(self.penalty_alpha) and self.top_k is not None and self.top_k > 1

    @property
    def sample(self) -> bool:
        """Draw at random (else the choice is deterministic: greedy or contrastive)."""
        return self.temperature > 0 and not self.contrastive

    def processors(self) -> list:
        """The logits processors in transformers' order; the warpers only when sampling."""
        processors = [RepetitionPenalty(self.repetition_penalty)] if self.repetition_penalty != 1.0 else []
        if self.sample:
            if self.temperature != 1.0:
                processors.append(Temperature(self.temperature))
            if self.top_k:
                processors.append(TopK(self.top_k))
            if self.top_p is not None and self.top_p < 1.0:
                processors.append(TopP(self.top_p))
            if self.min_p:
                processors.append(MinP(self.min_p))
        return processors


# ---- decoding ------------------------------------------------------------------------------


class _Context:
    """Everything a decoding loop carries: tokens so far, padding, the cache, the next scores."""

    def __init__(self, model: GPT, idx: torch.Tensor, mask: torch.Tensor, keep_hidden: bool, max_new_tokens: int):
        self.model, self.keep_hidden = model, keep_hidden
        self.tokens, self.mask = idx, mask.bool()
        self.length = None if model.max_context() else idx.size(1) + max_new_tokens  # None: block_size
        self.prefill(idx, self.mask)

    def prefill(self, idx: torch.Tensor, mask: torch.Tensor) -> None:
        """A fresh cache holding idx (at most its capacity: a longer prompt keeps its end)."""
        self.cache: KVCache = self.model.new_kv_cache(idx.size(0), length=self.length)
        idx, mask = idx[:, -self.cache.capacity :], mask[:, -self.cache.capacity :]
        h = self.model.hidden_states(idx, attention_mask=mask, kv_cache=self.cache)
        self.logits = self.model.logits(h[:, -1]).float()
        self.hidden = h if self.keep_hidden else None  # contrastive search compares with these
        self.hidden_mask = mask

    def slide(self) -> None:
        """The cache is full: rebuild it from each row's last block_size - 1 tokens."""
        keep = self.cache.capacity - 1
        self.prefill(self.tokens[:, -keep:], self.mask[:, -keep:])

    def append(self, next_tokens: torch.Tensor) -> None:
        self.tokens = torch.cat([self.tokens, next_tokens[:, None]], 1)
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(next_tokens), 1)], 1)

    def seen_tokens(self) -> torch.Tensor:
        """Tokens so far, with padding replaced by the row's last token (for repetition penalty)."""
        return torch.where(self.mask, self.tokens, self.tokens[:, -1:])

    def step(self, next_tokens: torch.Tensor) -> None:
        """Feed one token per row; the next scores come out."""
        self.append(next_tokens)
        if self.cache.length == self.cache.capacity:
            self.slide()  # the new token is among the kept ones
            return
        h = self.model.hidden_states(next_tokens[:, None], kv_cache=self.cache)
        self.logits = self.model.logits(h[:, -1]).float()

    def repeat(self, n: int) -> None:
        self.cache.repeat_rows(n)
        self.tokens, self.mask, self.logits = (t.repeat_interleave(n, 0) for t in (self.tokens, self.mask, self.logits))
        if self.keep_hidden:
            self.hidden, self.hidden_mask = self.hidden.repeat_interleave(n, 0), self.hidden_mask.repeat_interleave(n, 0)


def _contrastive_choice(ctx: _Context, scores: torch.Tensor, k: int, alpha: float) -> torch.Tensor:
    """One step of contrastive search: returns the chosen tokens and leaves ctx past them.

    The top-k candidates of each row run as one batched forward on a k-fold copy of the
    cache; each is scored (1 - alpha) p(v) - alpha max_j cos(h_v, h_j) over the row's
    previous hidden states h_j (padding excluded); the winner's cache row is kept.
    """
    B, k = scores.size(0), min(k, scores.size(-1))
    top_probs, top_ids = torch.topk(F.softmax(scores, dim=-1), k=k, dim=-1)  # (B, k)
    if ctx.cache.length == ctx.cache.capacity:
        ctx.slide()  # room for the candidates (the candidates themselves are already chosen)
    ctx.cache.repeat_rows(k)
    h_next = ctx.model.hidden_states(top_ids.reshape(-1, 1), kv_cache=ctx.cache)  # (B*k, 1, C)
    cand_logits = ctx.model.logits(h_next[:, -1]).float().view(B, k, -1)
    h_next = h_next.view(B, k, -1)
    context = ctx.hidden / ctx.hidden.norm(dim=-1, keepdim=True)  # (B, S, C)
    cosine = torch.einsum("bsc,bkc->bks", context, h_next / h_next.norm(dim=-1, keepdim=True))
    cosine = cosine.masked_fill(~ctx.hidden_mask[:, None, :], torch.finfo(cosine.dtype).min)
    contrastive = (1.0 - alpha) * top_probs - alpha * cosine.max(dim=-1)[0]  # (B, k)
    chosen = contrastive.argmax(dim=-1)  # (B,)
    rows = torch.arange(B, device=chosen.device)
    ctx.cache.select_rows(rows * k + chosen)
    next_tokens = top_ids[rows, chosen]
    ctx.append(next_tokens)
    ctx.logits = cand_logits[rows, chosen]
    ctx.hidden = torch.cat([ctx.hidden, h_next[rows, chosen][:, None]], 1)
    ctx.hidden_mask = torch.cat([ctx.hidden_mask, ctx.hidden_mask.new_ones(B, 1)], 1)
    return next_tokens


@torch.no_grad()
def stream(model: GPT, idx: torch.Tensor, max_new_tokens: int, sampling: SamplingConfig | None = None, *,
           attention_mask: torch.Tensor | None = None, num_samples: int = 1, eos_token_id: int | None = None,
           generator: torch.Generator | None = None, **settings) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, (B * num_samples,), one step at a time.

    The decoding settings are a SamplingConfig, or its fields as keywords (temperature=0,
    top_p=0.9, ...). Rows that reached eos_token_id keep yielding it. Stop iterating
    whenever you like.
    """
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if sampling is not None and settings:
        raise TypeError(f"give the decoding settings as a SamplingConfig or as keywords, not both: {sorted(settings)}")
    sampling = sampling or SamplingConfig(**settings)
    contrastive, sample = sampling.contrastive, sampling.sample
    processors = sampling.processors()
    was_training = model.training
    model.eval()
    mask = torch.ones_like(idx) if attention_mask is None else attention_mask.to(idx.device)
    ctx = _Context(model, idx, mask, keep_hidden=contrastive, max_new_tokens=max_new_tokens)
    if num_samples > 1:
        ctx.repeat(num_samples)
    finished = torch.zeros(ctx.tokens.size(0), dtype=torch.bool, device=idx.device)
    try:
        for _ in range(max_new_tokens):
            scores = ctx.logits
            for process in processors:
                scores = process(ctx.seen_tokens(), scores)
            if contrastive:
                next_tokens = _contrastive_choice(ctx, scores, sampling.top_k, sampling.penalty_alpha)
            else:
                if sample:
                    next_tokens = torch.multinomial(F.softmax(scores, dim=-1), 1, generator=generator)[:, 0]
                else:
                    next_tokens = scores.argmax(dim=-1)
            if eos_token_id is not None:
                next_tokens = next_tokens.masked_fill(finished, eos_token_id)
                finished |= next_tokens == eos_token_id
            if contrastive:
                ctx.tokens[:, -1] = next_tokens  # finished rows show eos (their cache is never read again)
            yield next_tokens
            if eos_token_id is not None and bool(finished.all()):
                return
            if not contrastive:
                ctx.step(next_tokens)
    finally:
        model.train(was_training)


def generate(model: GPT, idx: torch.Tensor, max_new_tokens: int, sampling: SamplingConfig | None = None, *,
             attention_mask: torch.Tensor | None = None, num_samples: int = 1, eos_token_id: int | None = None,
             generator: torch.Generator | None = None, **settings) -> torch.Tensor:
    """idx (B, T) -> (B * num_samples, T + new): the prompts followed by what was generated.

    Generation ends after max_new_tokens, or when every row has produced eos_token_id
    (rows that finished earlier are filled with it). See `stream` for the arguments.
    """
    steps = list(stream(model, idx, max_new_tokens, sampling, attention_mask=attention_mask, num_samples=num_samples,
                        eos_token_id=eos_token_id, generator=generator, **settings))
    prompt = idx.repeat_interleave(num_samples, 0)
    return torch.cat([prompt, torch.stack(steps, 1)], 1) if steps else prompt
