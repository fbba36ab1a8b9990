"""Text generation: logits processors and decoding loops, all on the KV cache.

    from gpt.sampling import SamplingConfig, generate, stream
    out = generate(model, idx, 100, temperature=0.8, top_k=200)        # (B, T + 100) token ids
    out = generate(model, idx, 100, SamplingConfig(temperature=0.8, top_k=200))   # the same
    out = generate(model, idx, 100, temperature=0)                      # greedy
    out = generate(model, idx, 100, penalty_alpha=0.6, top_k=4)         # contrastive search
    out = generate(model, idx, 100, num_beams=4)                         # beam search
    for tokens in stream(model, idx, 100, top_p=0.9): ...               # (B,) new tokens per step
    for step in steps(model, idx, 100, top_p=0.9): ...                  # step.tokens, step.scores (B, V)

Logits processors change the next-token scores before a choice is made. They
follow Hugging Face transformers exactly (same thresholds, same tie handling,
same -inf filter value) and apply in its order: repetition penalty, then, when
sampling, temperature, top-k, top-p, min-p.

Decoding loops: sampling (torch.multinomial, reproducible with a
torch.Generator), greedy (temperature=0), contrastive search (penalty_alpha > 0,
top_k > 1; Su et al. 2022) and beam search (num_beams > 1), the last two with
transformers' semantics, token for token. Every loop prefills the prompt once and
then runs one step per new token on the KV cache. A step's inputs are tensors
(positions and cache slots: KVCache.claim), so its shapes never change and
compile=True compiles it once (torch.compile; a CUDA graph on GPUs) for every
token of every request of the same batch size. Contrastive search runs its top_k
candidates as extra tokens of each row in one forward over the shared cache and
keeps the winner's keys and values; beam search reorders the cache rows in place.

Batches: prompts of different lengths are left-padded, with an attention_mask
(1 = token, 0 = padding; see `pad_sequences`); num_samples repeats each prompt's
cache after one prefill. A row stops at eos_token_id (later positions repeat it).
A model with learned positions reads at most block_size tokens: past that, the
context slides (the cache is rebuilt from each row's last tokens; contrastive
candidates then see the last block_size - 1, for any top_k: they take spare
cache slots, not positions). Models whose positions extrapolate
(GPT.max_context() is None) keep every token: their cache is sized to the prompt
plus max_new_tokens. A cache larger than the device's free memory is refused
before it is allocated (gpt.system.check_memory), with the estimate.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, fields
from typing import Iterator, NamedTuple

import torch
import torch.nn.functional as F

from gpt.errors import UserError
from gpt.model import GPT, KVCache, pad_sequences  # noqa: F401 (pad_sequences: for callers)
from gpt.system import check_memory

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


def _early_stopping(value) -> bool | str:
    """True, False or "never"; from the command line also "true" / "false"."""
    text = str(value).lower()
    if text in ("true", "false", "never"):
        return {"true": True, "false": False}.get(text, "never")
    raise UserError(f"early_stopping must be true, false or never, got {value!r}")


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
    num_beams: int = _setting(1, int, "> 1: beam search with this many beams (deterministic; temperature is "
                                      "not used)")
    length_penalty: float = _setting(1.0, float, "beam search: finished texts are scored sum log p / "
                                                 "length ** length_penalty, length = the tokens generated "
                                                 "(eos included, prompt not) (> 0 favours longer ones)")
    early_stopping: bool | str = _setting(False, str, "beam search: true (stop once num_beams texts are "
                                                      "finished), false (stop when none can get better, by "
                                                      "a heuristic) or never (by the exact bound)")

    def __post_init__(self):
        """Reject settings that have no meaning, with the name and the allowed range."""
        for f in fields(self):  # no setting means anything at NaN or ±inf (length_penalty has no range below)
            value = getattr(self, f.name)
            if f.metadata["type"] is float and value is not None and not abs(value) < float("inf"):
                raise UserError(f"{f.name} must be a finite number, got {value}")
        checks = [
            (self.temperature >= 0, "temperature must be >= 0 (0 = greedy)", self.temperature),
            (self.top_k is None or self.top_k >= 1, "top_k must be >= 1", self.top_k),
            (self.top_p is None or 0 < self.top_p <= 1, "top_p must be in (0, 1]", self.top_p),
            (self.min_p is None or 0 <= self.min_p <= 1, "min_p must be in [0, 1]", self.min_p),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0 (1 = off)", self.repetition_penalty),
            (self.penalty_alpha is None or 0 <= self.penalty_alpha <= 1, "penalty_alpha must be in [0, 1]",
             self.penalty_alpha),
            (self.num_beams >= 1, "num_beams must be >= 1 (1 = no beam search)", self.num_beams),
        ]
        for ok, message, value in checks:
            if not ok:
                raise UserError(f"{message}, got {value}")
        object.__setattr__(self, "early_stopping", _early_stopping(self.early_stopping))
        if self.num_beams > 1:
            given = [name for name in ("top_k", "top_p", "min_p", "penalty_alpha") if getattr(self, name) is not None]
            if given:
                raise UserError(f"beam search (num_beams > 1) does not sample or contrast candidates: drop "
                                f"{', '.join(given)}, or set num_beams to 1")

    @property
    def contrastive(self) -> bool:
        return bool(self.penalty_alpha) and self.top_k is not None and self.top_k > 1

    @property
    def sample(self) -> bool:
        """Draw at random (else the choice is deterministic: greedy, contrastive or beam search)."""
        return self.temperature > 0 and not self.contrastive and self.num_beams == 1

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


def _whole_step(model: GPT, tokens: torch.Tensor, cursor: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """One decoding step of one new token per row, all on the device: claim the cache slot
    (its number is `cursor`, a tensor, so no Python number changes between steps), run the
    model on the cache and take the last position's logits. -> the next logits (B, V), fp32.
    Compiled, it is one graph per step (on CUDA, a CUDA graph replayed without the host
    waiting for it). The logits processors run after it: their settings are Python numbers,
    and each new value would be another compile."""
    slots, pos = cursor.clone(), cache.next_pos[:, None].clone()
    cache.pos.index_copy_(1, slots, pos)
    cursor.add_(1)
    cache.next_pos.add_(1)
    return model.logits(model.decode(tokens[:, None], pos, slots, cache)[:, -1]).float()


@functools.cache
def _compiled(function, device_type: str):
    """A step function compiled per kind of device (torch.compile keeps one graph per model,
    batch size and cache size). On CUDA, mode="reduce-overhead" replays it as a CUDA graph."""
    mode = "reduce-overhead" if device_type == "cuda" else None
    return torch.compile(function, mode=mode, dynamic=False, fullgraph=True)


class _Context:
    """Everything a decoding loop carries: tokens so far, padding, the cache, the next scores.

    copies: rows decoded per prompt (num_samples, or the beams), made from one prefill.
    spare: extra cache slots a step needs (contrastive search writes its k candidates to
    the cache, all at one position, then keeps one). compile: run each step through the
    compiled GPT.decode on a static cache (the prompt's prefill stays eager).
    processors: the logits processors of `scores`. A compiled step that feeds one token
    per row (greedy decoding and sampling) runs as one graph (_whole_step).
    """

    def __init__(self, model: GPT, idx: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, *, copies: int = 1,
                 spare: int = 0, keep_hidden: bool = False, compile: bool = False, processors: list = ()):
        self.model, self.keep_hidden, self.spare = model, keep_hidden, spare
        self.processors = list(processors)
        self.tokens, self.mask = idx, mask.bool()
        self.capacity = idx.size(1) + max_new_tokens + spare
        if compile:  # a few cache sizes, so requests of similar lengths share one compiled step
            self.capacity = -(-self.capacity // 256) * 256
        if model.max_context():  # learned positions: at most block_size, then the context slides
            self.capacity = min(self.capacity, model.max_context() + spare)
        self.compiled = _compiled(GPT.decode, idx.device.type) if compile else None
        self.whole_step = _compiled(_whole_step, idx.device.type) if compile else None
        # while the prompts' cache is copied, it and the copies exist together
        self.check_memory(idx.size(0) * copies + (idx.size(0) if copies > 1 else 0), idx.size(1), max_new_tokens)
        self.prefill(idx, self.mask)
        if copies > 1:
            self.repeat(copies)

    def check_memory(self, rows: int, prompt_length: int, max_new_tokens: int) -> None:
        """Refuse a cache of `rows` rows that the device has no room for, before allocating it."""
        weights = self.model.transformer.wte.weight
        fixed = KVCache.nbytes(self.model.config, rows, 0, weights.dtype)  # linear attention's state
        per_slot = KVCache.nbytes(self.model.config, rows, 1, weights.dtype) - fixed
        fewer_rows = "num_samples, num_beams or the number of prompts"

        def advice(free: int) -> str:
            fit = (free - fixed) // per_slot - prompt_length - self.spare  # the max_new_tokens whose cache fits
            return (f"lower max_new_tokens (about {fit:,} fit) or {fewer_rows}" if fit > 0
                    else f"lower {fewer_rows}, or shorten the prompts")

        check_memory(fixed + per_slot * self.capacity, weights.device,
                     f"generating {max_new_tokens:,} tokens (a KV cache of {self.capacity:,} positions)", advice)

    def prefill(self, idx: torch.Tensor, mask: torch.Tensor) -> None:
        """A fresh cache holding idx (at most its capacity less the spare slots: a longer prompt
        keeps its end)."""
        self.cache: KVCache = self.model.new_kv_cache(idx.size(0), length=self.capacity - self.spare, spare=self.spare)
        keep = self.capacity - self.spare
        idx, mask = idx[:, -keep:], mask[:, -keep:]
        h = self.model.hidden_states(idx, attention_mask=mask, kv_cache=self.cache)
        self.cache.static = self.compiled is not None
        self.logits = self.model.logits(h[:, -1]).float()
        self.cursor = torch.tensor([self.cache.length], device=idx.device)  # the next free slot, for _whole_step
        self.hidden = h if self.keep_hidden else None  # contrastive search compares with these
        self.hidden_mask = mask

    def scores(self) -> torch.Tensor:
        """The next-token scores after the logits processors."""
        scores = self.logits
        for process in self.processors:
            scores = process(self.seen_tokens(), scores)
        return scores

    def forward(self, idx: torch.Tensor, candidates: bool = False) -> torch.Tensor:
        """Hidden states of new tokens idx (B, T) on the cache. candidates: the T tokens are
        alternatives for each row's next token (each sees the row, not the others)."""
        cache = self.cache
        if self.compiled is None and not candidates:
            return self.model.hidden_states(idx, kv_cache=cache)
        pos, slots = cache.claim_candidates(idx.size(1)) if candidates else cache.claim(idx.size(1))
        if self.compiled is None:
            return self.model.decode(idx, pos, slots, cache)
        self.mark_static()
        return self.compiled(self.model, idx, pos, slots, cache).clone()  # a graph's output is reused

    def mark_static(self) -> None:
        """CUDA graphs read and write the cache in place: its addresses must not change."""
        if self.cursor.is_cuda:
            for t in (*self.cache.tensors(), self.cache.next_pos, self.cursor):
                torch._dynamo.mark_static_address(t)

    def slide(self, room: int = 1) -> None:
        """The cache is full: rebuild it from each row's last tokens, leaving `room` free slots
        besides the spare ones."""
        keep = self.capacity - self.spare - room
        self.prefill(self.tokens[:, -keep:], self.mask[:, -keep:])

    def append(self, next_tokens: torch.Tensor) -> None:
        self.tokens = torch.cat([self.tokens, next_tokens[:, None]], 1)
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(next_tokens), 1)], 1)

    def seen_tokens(self) -> torch.Tensor:
        """Tokens so far, with padding replaced by the row's last token (for repetition penalty)."""
        return torch.where(self.mask, self.tokens, self.tokens[:, -1:])

    def step(self, next_tokens: torch.Tensor, whole: bool = False) -> None:
        """Feed one token per row; the next scores come out. whole: as one compiled graph
        (_whole_step; a compiled context only)."""
        self.append(next_tokens)
        if self.cache.length + self.spare == self.cache.capacity:
            self.slide(room=0)  # the new token is among the kept ones
            return
        if whole and self.whole_step is not None:
            self.mark_static()
            self.cache.length += 1  # the Python count of the slot the graph claims (self.cursor)
            self.logits = self.whole_step(self.model, next_tokens, self.cursor, self.cache).clone()
            return
        self.logits = self.model.logits(self.forward(next_tokens[:, None])[:, -1]).float()
        self.cursor.fill_(self.cache.length)  # for a whole step after this one

    def select(self, rows: torch.Tensor) -> None:
        """Keep the given rows in the given order (repeats allowed), cache included."""
        self.cache.select_rows(rows)
        self.tokens, self.mask, self.logits = self.tokens[rows], self.mask[rows], self.logits[rows]
        if self.keep_hidden:
            self.hidden, self.hidden_mask = self.hidden[rows], self.hidden_mask[rows]

    def repeat(self, n: int) -> None:
        self.select(torch.arange(self.tokens.size(0), device=self.tokens.device).repeat_interleave(n))


def _contrastive_choice(ctx: _Context, scores: torch.Tensor, k: int, alpha: float) -> torch.Tensor:
    """One step of contrastive search: returns the chosen tokens and leaves ctx past them.

    The top-k candidates of each row run as k more tokens of the same row, all at its next
    position and masked from each other, in one forward over the shared cache (the weights
    are read once for all of them, and the cache is not copied). Each is scored
    (1 - alpha) p(v) - alpha max_j cos(h_v, h_j) over the row's previous hidden states h_j
    (padding excluded); the winner's keys and values stay in the cache, and only its
    next-token scores are computed.
    """
    B, k = scores.size(0), min(k, scores.size(-1))
    top_probs, top_ids = torch.topk(F.softmax(scores, dim=-1), k=k, dim=-1)  # (B, k)
    if ctx.cache.length + k > ctx.cache.capacity:
        ctx.slide(room=1)  # the spare slots and one more hold the candidates (already chosen)
    h_next = ctx.forward(top_ids, candidates=True)  # (B, k, C)
    context = ctx.hidden / ctx.hidden.norm(dim=-1, keepdim=True)  # (B, S, C)
    cosine = torch.einsum("bsc,bkc->bks", context, h_next / h_next.norm(dim=-1, keepdim=True))
    cosine = cosine.masked_fill(~ctx.hidden_mask[:, None, :], torch.finfo(cosine.dtype).min)
    contrastive = (1.0 - alpha) * top_probs - alpha * cosine.max(dim=-1)[0]  # (B, k)
    chosen = contrastive.argmax(dim=-1)  # (B,)
    ctx.cache.keep_candidate(chosen)
    rows = torch.arange(B, device=chosen.device)
    next_tokens, winner = top_ids[rows, chosen], h_next[rows, chosen]  # (B,), (B, C)
    ctx.append(next_tokens)
    ctx.logits = ctx.model.logits(winner).float()
    ctx.hidden = torch.cat([ctx.hidden, winner[:, None]], 1)
    ctx.hidden_mask = torch.cat([ctx.hidden_mask, ctx.hidden_mask.new_ones(B, 1)], 1)
    return next_tokens


def _start(model: GPT, idx: torch.Tensor, max_new_tokens: int, sampling: SamplingConfig | None,
           attention_mask: torch.Tensor | None, num_samples: int, compile: bool | None, settings: dict,
           beams: bool = False):
    """Check the arguments, put the model in eval mode; -> (sampling, context), the context
    holding num_samples rows per prompt (beams: num_beams rows, of which num_samples return)."""
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if sampling is not None and settings:
        raise TypeError(f"give the decoding settings as a SamplingConfig or as keywords, not both: {sorted(settings)}")
    sampling = sampling or SamplingConfig(**settings)
    if num_samples < 1:
        raise UserError(f"num_samples must be at least 1, got {num_samples}")
    if beams and num_samples > sampling.num_beams:
        raise UserError(f"beam search returns at most num_beams ({sampling.num_beams}) texts per prompt, "
                        f"asked for num_samples={num_samples}")
    compile = idx.is_cuda if compile is None else compile
    model.eval()
    mask = torch.ones_like(idx) if attention_mask is None else attention_mask.to(idx.device)
    spare = min(sampling.top_k, model.config.vocab_size) - 1 if sampling.contrastive else 0
    copies = sampling.num_beams if beams else num_samples
    ctx = _Context(model, idx, mask, max_new_tokens, copies=copies, spare=spare, keep_hidden=sampling.contrastive,
                   compile=compile, processors=sampling.processors())
    return sampling, ctx


def stream(model: GPT, idx: torch.Tensor, max_new_tokens: int, sampling: SamplingConfig | None = None, *,
           attention_mask: torch.Tensor | None = None, num_samples: int = 1, eos_token_id: int | None = None,
           generator: torch.Generator | None = None, compile: bool | None = None,
           **settings) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, (B * num_samples,), one step at a time.

    The decoding settings are a SamplingConfig, or its fields as keywords (temperature=0,
    top_p=0.9, ...). Rows that reached eos_token_id keep yielding it. Stop iterating
    whenever you like. compile: run each step as one compiled graph (torch.compile; a CUDA
    graph on GPUs); the first step of a new model or batch size then takes the compile
    time. Default: on for CUDA, off on CPU, where it did not help (benchmarks/RESULTS.md).
    Beam search chooses its text at the end: use `generate`.
    """
    return (step.tokens for step in steps(model, idx, max_new_tokens, sampling, attention_mask=attention_mask,
                                          num_samples=num_samples, eos_token_id=eos_token_id, generator=generator,
                                          compile=compile, **settings))


class Step(NamedTuple):
    tokens: torch.Tensor  # (B,) the tokens chosen
    scores: torch.Tensor  # (B, V) the scores they were chosen from, after the logits processors (-inf: filtered out)


def steps(model: GPT, idx: torch.Tensor, max_new_tokens: int, sampling: SamplingConfig | None = None, *,
          attention_mask: torch.Tensor | None = None, num_samples: int = 1, eos_token_id: int | None = None,
          generator: torch.Generator | None = None, compile: bool | None = None, **settings) -> Iterator[Step]:
    """stream, with the scores of each step: softmax(step.scores) are the probabilities the
    tokens were drawn from (sampling) or picked by (greedy: the largest; contrastive search
    ranks its top_k by them and by similarity)."""
    if (sampling.num_beams if sampling else settings.get("num_beams", 1)) > 1:
        raise UserError("beam search chooses its text only at the end, so it cannot stream: use generate() "
                        "(sample.py: --no-stream)")
    return _steps(model, idx, max_new_tokens, sampling, attention_mask, num_samples, eos_token_id, generator, compile,
                  settings, check_every=1)


@torch.inference_mode()
def _steps(model: GPT, idx: torch.Tensor, max_new_tokens: int, sampling: SamplingConfig | None,
           attention_mask: torch.Tensor | None, num_samples: int, eos_token_id: int | None,
           generator: torch.Generator | None, compile: bool | None, settings: dict,
           check_every: int) -> Iterator[Step]:
    """stream's loop. It asks the device whether every row has finished (a wait for the
    device) every check_every steps only; until then finished rows yield eos_token_id."""
    was_training = model.training
    try:
        sampling, ctx = _start(model, idx, max_new_tokens, sampling, attention_mask, num_samples, compile, settings)
        contrastive, sample = sampling.contrastive, sampling.sample
        finished = torch.zeros(ctx.tokens.size(0), dtype=torch.bool, device=idx.device)
        for step in range(max_new_tokens):
            scores = ctx.scores()
            if contrastive:
                next_tokens = _contrastive_choice(ctx, scores, sampling.top_k, sampling.penalty_alpha)
            elif sample:
                next_tokens = torch.multinomial(F.softmax(scores, dim=-1), 1, generator=generator)[:, 0]
            else:
                next_tokens = scores.argmax(dim=-1)
            if eos_token_id is not None:
                next_tokens = next_tokens.masked_fill(finished, eos_token_id)
                finished |= next_tokens == eos_token_id
            if contrastive:
                ctx.tokens[:, -1] = next_tokens  # finished rows show eos (their cache is never read again)
            yield Step(next_tokens, scores)
            if eos_token_id is not None and (step + 1) % check_every == 0 and bool(finished.all()):
                return
            if not contrastive:
                ctx.step(next_tokens, whole=True)
    finally:
        model.train(was_training)


@torch.inference_mode()
def beam_search(model: GPT, idx: torch.Tensor, max_new_tokens: int, sampling: SamplingConfig | None = None, *,
                attention_mask: torch.Tensor | None = None, num_samples: int = 1, eos_token_id: int | None = None,
                compile: bool | None = None, **settings) -> torch.Tensor:
    """Beam search, with Hugging Face transformers' semantics: -> (B * num_samples, T + new),
    the num_samples best of sampling.num_beams beams for each prompt, best first.

    Each step extends every running beam by every token and keeps the 2 x num_beams best
    continuations by summed log-probability: those ending in eos_token_id (or reaching
    max_new_tokens) are finished hypotheses, scored sum / length ** length_penalty (length: the
    tokens generated, eos included, prompt not; older transformers counted the prompt), and
    the best num_beams others run on. It stops when no running beam can beat the finished
    ones (early_stopping: False, a heuristic; True, as soon as num_beams are finished;
    "never", the exact bound). Beams are rows of one batch; each step reorders the KV cache
    rows in place. Positions after a hypothesis's eos hold eos.
    """
    was_training = model.training
    try:
        sampling, ctx = _start(model, idx, max_new_tokens, sampling, attention_mask, num_samples, compile, settings,
                               beams=True)
        B, T, n_beams, V = idx.size(0), idx.size(1), sampling.num_beams, model.config.vocab_size
        processors, early, penalty = ctx.processors, sampling.early_stopping, sampling.length_penalty
        device, big = idx.device, -1.0e9  # big: transformers' stand-in for minus infinity
        width = T + max_new_tokens
        fill = -1 if eos_token_id is None else eos_token_id
        n_keep = 2 * n_beams  # enough that num_beams continuations run on even if the best ones all end
        in_top = torch.arange(n_keep, device=device) < n_beams
        batch_rows = torch.arange(B, device=device)[:, None] * n_beams
        running = torch.zeros(B, n_beams, device=device)
        running[:, 1:] = big  # all beams start equal: only the first one's continuations count
        done_tokens = torch.full((B, n_beams, width), fill, dtype=torch.long, device=device)
        done_scores = torch.full((B, n_beams), big, device=device)
        done_length = torch.zeros(B, n_beams, dtype=torch.long, device=device)
        done = torch.zeros(B, n_beams, dtype=torch.bool, device=device)
        improvable = torch.ones(B, 1, dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            log_probs = F.log_softmax(ctx.logits, dim=-1)
            for process in processors:
                log_probs = process(ctx.seen_tokens(), log_probs)
            scores = (log_probs.view(B, n_beams, V) + running[:, :, None]).view(B, n_beams * V)
            top_scores, top = torch.topk(scores, n_keep)  # (B, 2 num_beams)
            source, tokens = top // V + batch_rows, top % V  # the row each continues, its new token
            ends = torch.full_like(tokens, step == max_new_tokens - 1, dtype=torch.bool)
            if eos_token_id is not None:
                ends |= tokens == eos_token_id
            # the best num_beams continuations that have not ended run on
            alive_scores = top_scores + ends.to(torch.float32) * big
            keep = torch.topk(alive_scores, n_beams)[1]
            running = alive_scores.gather(1, keep)
            # finished hypotheses among the top num_beams enter the finished list if good enough
            new_scores = top_scores / ((step + 1) ** penalty)
            new_scores += (done.all(-1, keepdim=True) & (early is True)).to(torch.float32) * big
            new_scores += (~improvable).to(torch.float32) * big
            new_scores += ~(ends & in_top) * big
            candidates = torch.cat([ctx.tokens[source], tokens[:, :, None]], 2)  # (B, 2 num_beams, T + step + 1)
            candidates = F.pad(candidates, (0, width - candidates.size(2)), value=fill)
            best = torch.topk(torch.cat([done_scores, new_scores], 1), n_beams)[1]
            done_tokens = torch.cat([done_tokens, candidates], 1).gather(1, best[:, :, None].expand(-1, -1, width))
            done_scores = torch.cat([done_scores, new_scores], 1).gather(1, best)
            done_length = torch.cat([done_length, torch.full_like(tokens, step + 1)], 1).gather(1, best)
            done = torch.cat([done, ends & in_top], 1).gather(1, best)
            # could a running beam still beat the worst finished one?
            best_length = max_new_tokens if early == "never" and penalty > 0.0 else step + 1
            best_possible = running[:, :1] / (best_length ** penalty)
            worst_done = torch.where(done, torch.min(done_scores, dim=1, keepdim=True)[0], big)
            improvable = improvable & torch.any(best_possible > worst_done, dim=-1, keepdim=True)
            if not bool(improvable.any()) or (early is True and bool(done.all())) or bool(ends.all()):
                break
            ctx.select(source.gather(1, keep).flatten())
            ctx.step(tokens.gather(1, keep).flatten())
        length = T + int(done_length[:, :num_samples].max())
        return done_tokens[:, :num_samples, :length].reshape(B * num_samples, length)
    finally:
        model.train(was_training)


def generate(model: GPT, idx: torch.Tensor, max_new_tokens: int, sampling: SamplingConfig | None = None, *,
             attention_mask: torch.Tensor | None = None, num_samples: int = 1, eos_token_id: int | None = None,
             generator: torch.Generator | None = None, compile: bool | None = None, **settings) -> torch.Tensor:
    """idx (B, T) -> (B * num_samples, T + new): the prompts followed by what was generated.

    Generation ends after max_new_tokens, or when every row has produced eos_token_id
    (rows that finished earlier are filled with it). See `stream` for the arguments.
    With num_beams > 1 this is `beam_search` (num_samples: the best beams to return).
    """
    if (sampling.num_beams if sampling else settings.get("num_beams", 1)) > 1:
        return beam_search(model, idx, max_new_tokens, sampling, attention_mask=attention_mask,
                           num_samples=num_samples, eos_token_id=eos_token_id, compile=compile, **settings)
    # the device is asked whether every row has finished every 16 tokens, not after each one
    new = torch.stack([step.tokens for step in _steps(model, idx, max_new_tokens, sampling, attention_mask,
                                                        num_samples, eos_token_id, generator, compile, settings,
                                                        check_every=16)], 1)
    if eos_token_id is not None:  # end after the first step at which every row had finished (as stream does)
        finished = (new == eos_token_id).all(0).nonzero()
        if len(finished):
            new = new[:, : int(finished[0]) + 1]
    return torch.cat([idx.repeat_interleave(num_samples, 0), new], 1)
