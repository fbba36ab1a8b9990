"""Generation: processors equal transformers', greedy, contrastive and beam search token-identical
to transformers, compiled = eager, no cache copies, cache vs no cache, batches, sampling,
sliding window, eos, bad settings."""

import re

import pytest
import torch
import torch.nn.functional as F

from gpt import GPT, GPTConfig, UserError
from gpt.hf import from_pretrained
from gpt.sampling import (MinP, RepetitionPenalty, SamplingConfig, Temperature, TopK, TopP, _contrastive_choice, _Context,
                          generate, pad_sequences, stream)

transformers = pytest.importorskip("transformers")
from transformers.generation import logits_process as hf_lp  # noqa: E402

# ---- processors ------------------------------------------------------------------------------


def random_scores(seed, B=4, V=50, ties=False):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(B, V, generator=g) * 3
    return scores.round(decimals=0) if ties else scores  # rounding makes many exact ties


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize(
    "ours, theirs",
    [
        (Temperature(0.7), hf_lp.TemperatureLogitsWarper(0.7)),
        (TopK(1), hf_lp.TopKLogitsWarper(1)),
        (TopK(7), hf_lp.TopKLogitsWarper(7)),
        (TopK(500), hf_lp.TopKLogitsWarper(500)),
        (TopP(0.9), hf_lp.TopPLogitsWarper(0.9)),
        (TopP(0.3), hf_lp.TopPLogitsWarper(0.3)),
        (TopP(1e-6), hf_lp.TopPLogitsWarper(1e-6)),
        (MinP(0.1), hf_lp.MinPLogitsWarper(0.1)),
        (MinP(0.9), hf_lp.MinPLogitsWarper(0.9)),
        (RepetitionPenalty(1.3), hf_lp.RepetitionPenaltyLogitsProcessor(1.3)),
        (RepetitionPenalty(0.8), hf_lp.RepetitionPenaltyLogitsProcessor(0.8)),
    ],
    ids=lambda p: f"{type(p).__name__}({next(iter(vars(p).values()), '')})" if not isinstance(p, bool) else str(p),
)
def test_processor_equals_transformers(ours, theirs, ties):
    for seed in range(5):
        scores = random_scores(seed, ties=ties)
        seen = torch.randint(0, 50, (4, 12), generator=torch.Generator().manual_seed(seed))  # with repeats
        torch.testing.assert_close(ours(seen, scores.clone()), theirs(seen, scores.clone()), rtol=0, atol=0)


# ---- models ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A random GPT-2 in transformers and the same weights in ours (initializer_range 0.1 makes
    the next-token distributions peaked enough that fp32 rounding never decides a choice)."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=64, vocab_size=211,
                                     initializer_range=0.1, eos_token_id=210, bos_token_id=210)
    hf = transformers.GPT2LMHeadModel(config).eval()
    path = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(path)
    return hf, from_pretrained(path).eval()


PROMPTS = [[5], [17, 3, 99, 42], list(range(100, 117)), [7, 7, 7, 7, 7, 7, 8]]


def hf_generate(hf, ids, **kw):
    idx = torch.tensor([ids])
    out = hf.generate(idx, attention_mask=torch.ones_like(idx), do_sample=False, pad_token_id=210, **kw)
    return out[0].tolist()


@pytest.mark.parametrize("prompt", PROMPTS, ids=lambda p: f"len{len(p)}")
def test_greedy_equals_transformers(models, prompt):
    hf, ours = models
    expected = hf_generate(hf, prompt, max_new_tokens=20)
    assert generate(ours, torch.tensor([prompt]), 20, temperature=0)[0].tolist() == expected
    expected = hf_generate(hf, prompt, max_new_tokens=20, repetition_penalty=1.5)
    assert generate(ours, torch.tensor([prompt]), 20, temperature=0, repetition_penalty=1.5)[0].tolist() == expected


@pytest.mark.parametrize("prompt", PROMPTS, ids=lambda p: f"len{len(p)}")
@pytest.mark.parametrize("alpha, k", [(0.6, 4), (0.3, 6)])
def test_contrastive_search_equals_transformers(models, prompt, alpha, k):
    hf, ours = models
    expected = hf_generate(hf, prompt, max_new_tokens=25, penalty_alpha=alpha, top_k=k)
    got = generate(ours, torch.tensor([prompt]), 25, penalty_alpha=alpha, top_k=k)[0].tolist()
    assert got == expected


def test_contrastive_search_on_a_left_padded_batch_equals_transformers(models):
    hf, ours = models
    idx, mask = pad_sequences(PROMPTS, pad_id=210)
    expected = hf.generate(idx, attention_mask=mask, do_sample=False, penalty_alpha=0.6, top_k=4,
                           max_new_tokens=15, pad_token_id=210)
    got = generate(ours, idx, 15, penalty_alpha=0.6, top_k=4, attention_mask=mask)
    assert got.tolist() == expected.tolist()


@pytest.mark.parametrize("prompt", PROMPTS, ids=lambda p: f"len{len(p)}")
@pytest.mark.parametrize("num_beams, length_penalty, early_stopping",
                         [(2, 1.0, False), (4, 1.0, False), (4, 0.5, True), (3, -1.0, "never"), (4, 2.0, "never")])
def test_beam_search_equals_transformers(models, prompt, num_beams, length_penalty, early_stopping):
    hf, ours = models
    settings = dict(num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping)
    free = hf_generate(hf, prompt, max_new_tokens=12)
    for eos in (210, free[len(prompt) + 3]):  # eos never generated / generated: hypotheses finish early
        idx = torch.tensor([prompt])
        expected = hf.generate(idx, attention_mask=torch.ones_like(idx), do_sample=False, max_new_tokens=12,
                               pad_token_id=eos, eos_token_id=eos, **settings)
        got = generate(ours, idx, 12, eos_token_id=eos, **settings)
        assert got.tolist() == expected.tolist()


def test_beam_search_on_a_left_padded_batch_returns_the_best_beams_like_transformers(models):
    hf, ours = models
    idx, mask = pad_sequences(PROMPTS, pad_id=210)
    for n in (1, 3):
        expected = hf.generate(idx, attention_mask=mask, do_sample=False, num_beams=4, num_return_sequences=n,
                               max_new_tokens=15, pad_token_id=210, repetition_penalty=1.3)
        got = generate(ours, idx, 15, num_beams=4, attention_mask=mask, eos_token_id=210, num_samples=n,
                       repetition_penalty=1.3)
        assert got.tolist() == expected.tolist()


@pytest.mark.parametrize("settings", [dict(penalty_alpha=0.6, top_k=4), dict(num_beams=3)], ids=["contrastive", "beam"])
def test_decoding_steps_never_copy_the_cache(models, settings):
    """Contrastive search writes its candidates into spare slots of the one cache and beams are
    reordered in place: the cache's storage is the same at every step."""
    _, ours = models
    sampling = SamplingConfig(**settings)
    with torch.no_grad():
        ctx = _Context(ours, torch.tensor([PROMPTS[2]]), torch.ones(1, 17), 10,
                       spare=3 if sampling.contrastive else 0, keep_hidden=sampling.contrastive)
        if not sampling.contrastive:
            ctx.repeat(3)
        storage = ctx.cache.k.untyped_storage().data_ptr(), ctx.cache.v.untyped_storage().data_ptr()
        for _ in range(10):
            if sampling.contrastive:
                _contrastive_choice(ctx, ctx.logits, 4, 0.6)
            else:
                ctx.select(torch.tensor([2, 0, 0]))
                ctx.step(ctx.logits.argmax(-1))
            assert (ctx.cache.k.untyped_storage().data_ptr(), ctx.cache.v.untyped_storage().data_ptr()) == storage
    assert ctx.cache.length == 17 + 10


@pytest.mark.slow
def test_compiled_decoding_equals_eager_and_transformers(models):
    """compile=True: the static cache and the compiled step (torch.compile; inductor on CPU)."""
    hf, ours = models
    for prompt in PROMPTS[1:3]:  # one compiled graph per step shape serves both
        idx = torch.tensor([prompt])
        for settings, hf_settings in [(dict(temperature=0), {}), (dict(penalty_alpha=0.6, top_k=4), {})]:
            hf_settings = {k: v for k, v in settings.items() if k != "temperature"}
            expected = hf_generate(hf, prompt, max_new_tokens=20, **hf_settings)
            assert generate(ours, idx, 20, compile=True, **settings)[0].tolist() == expected
            assert generate(ours, idx, 20, compile=False, **settings)[0].tolist() == expected


@pytest.mark.slow
def test_a_compiled_step_runs_whole_and_gives_the_eager_tokens():
    """compile=True runs a greedy or sampling step as one graph (cache bookkeeping, model, logits
    processors; the repetition penalty after it): the same tokens as eager decoding for the same
    seed, across a context slide (learned positions, block_size 24)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=24, vocab_size=211, n_layer=2, n_head=4, n_embd=64)).eval()
    idx = torch.tensor([[17, 3, 99, 42], [5, 6, 7, 8]])
    for settings in (dict(temperature=0), dict(temperature=0.8, top_k=20, top_p=0.9), dict(temperature=0.7, min_p=0.1),
                     dict(temperature=0.9, repetition_penalty=1.3)):
        runs = [generate(model, idx, 40, generator=torch.Generator().manual_seed(1), compile=compile, **settings)
                for compile in (False, True)]
        assert torch.equal(*runs), settings


# ---- our own guarantees ---------------------------------------------------------------------------


def uncached_greedy(model, prompt, n):
    """Reference: a full forward over the whole sequence for every new token."""
    tokens = list(prompt)
    for _ in range(n):
        logits = model.logits(model.hidden_states(torch.tensor([tokens])))[0, -1]
        tokens.append(int(logits.argmax()))
    return tokens


def test_cached_generation_equals_uncached(models):
    _, ours = models
    for prompt in PROMPTS:
        assert generate(ours, torch.tensor([prompt]), 30, temperature=0)[0].tolist() == uncached_greedy(ours, prompt, 30)


@pytest.mark.parametrize("settings", [dict(temperature=0), dict(penalty_alpha=0.6, top_k=4)], ids=["greedy", "contrastive"])
def test_mixed_length_batch_equals_one_by_one(models, settings):
    _, ours = models
    idx, mask = pad_sequences(PROMPTS, pad_id=0)
    batch = generate(ours, idx, 12, attention_mask=mask, **settings)
    for i, prompt in enumerate(PROMPTS):
        alone = generate(ours, torch.tensor([prompt]), 12, **settings)[0].tolist()
        assert batch[i, idx.size(1) - len(prompt):].tolist() == alone


def test_seeded_sampling_is_reproducible_and_num_samples_share_one_prompt(models):
    _, ours = models
    idx = torch.tensor([PROMPTS[1]])

    def sample(seed, **kw):
        g = torch.Generator().manual_seed(seed)
        return generate(ours, idx, 20, temperature=0.9, top_k=50, top_p=0.95, min_p=0.01, generator=g,
                        num_samples=3, **kw)

    a, b, c = sample(1), sample(1), sample(2)
    assert a.shape == (3, 24) and torch.equal(a, b) and not torch.equal(a, c)
    assert (a[:, :4] == idx).all() and len({tuple(r) for r in a.tolist()}) > 1  # samples differ
    greedy = generate(ours, idx, 10, temperature=0, num_samples=2)
    assert torch.equal(greedy[0], greedy[1])


def test_stream_yields_what_generate_returns(models):
    _, ours = models
    idx = torch.tensor([PROMPTS[2]])
    steps = list(stream(ours, idx, 9, temperature=0))
    assert len(steps) == 9 and all(s.shape == (1,) for s in steps)
    assert torch.cat([idx[0], torch.cat(steps)]).tolist() == generate(ours, idx, 9, temperature=0)[0].tolist()


def sliding_model() -> GPT:
    """A learned-position model with block_size 16 whose weights (x 5) give varied text, so that
    a window of the wrong length changes the tokens."""
    torch.manual_seed(3)
    model = GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=32)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(5)
    return model


@torch.no_grad()
def test_context_slides_past_block_size():
    model = sliding_model()
    prompt = list(range(20, 30))
    out = generate(model, torch.tensor([prompt]), 40, temperature=0)[0].tolist()
    # reference, without a cache: each next token is predicted from the last block_size tokens
    tokens = list(prompt)
    for _ in range(40):
        logits = model.logits(model.hidden_states(torch.tensor([tokens[-16:]])))[0, -1]
        tokens.append(int(logits.argmax()))
    assert out == tokens and len(set(out[10:])) > 5


def sliding_contrastive(model: GPT, prompt: list[int], n: int, alpha: float, k: int) -> list[int]:
    """Reference contrastive search without a cache for a learned-position model: the next-token
    scores come from the last block_size tokens, and each candidate is read after the last
    block_size - 1 (so that it fits), whose hidden states it is compared with."""
    window, tokens = model.config.block_size, list(prompt)
    for _ in range(n):
        probs = model.logits(model.hidden_states(torch.tensor([tokens[-window:]])))[0, -1].softmax(-1)
        top_probs, top_ids = probs.topk(min(k, probs.numel()))
        context = tokens[-(window - 1):]
        h = F.normalize(model.hidden_states(torch.tensor([context]))[0], dim=-1)  # (S, C)
        h_next = model.hidden_states(torch.tensor([context + [c] for c in top_ids.tolist()]))[:, -1]  # (k, C)
        penalty = (F.normalize(h_next, dim=-1) @ h.T).max(dim=-1)[0]
        tokens.append(int(top_ids[((1 - alpha) * top_probs - alpha * penalty).argmax()]))
    return tokens


@torch.no_grad()
@pytest.mark.parametrize("top_k", [3, 9, 15, 40], ids=lambda k: f"top_k{k}")
def test_contrastive_search_slides_past_block_size_with_any_top_k(top_k):
    """top_k above block_size / 2 (9, 15) and above block_size (40): the candidates take spare
    cache slots, not positions, so the window is the same for every top_k."""
    model = sliding_model()
    for prompt in (list(range(20, 30)), list(range(1, 21))):  # shorter and longer than block_size
        out = generate(model, torch.tensor([prompt]), 30, penalty_alpha=0.6, top_k=top_k)[0].tolist()
        assert out == sliding_contrastive(model, prompt, 30, 0.6, top_k)
        assert len(set(out[len(prompt):])) > 5


def test_a_kv_cache_beyond_free_memory_is_refused_before_it_is_allocated():
    """A RoPE model keeps every token, so 10**12 new tokens would need 136 TB of cache per row: generate,
    stream and beam search refuse it in one line with the estimate (allocating would fail with
    a RuntimeError: the refusal shows that it was never tried)."""
    model = GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=1, n_head=2, n_embd=16, position="rope"))
    idx = torch.tensor([[1, 2, 3]])
    message = (r"generating 1,000,000,000,000 tokens \(a KV cache of 1,000,000,000,00[34] positions\) needs about "
               r"[\d,.]+ GiB, but cpu has [\d,.]+ GiB free: lower max_new_tokens \(about [\d,]+ fit\) or num_samples")
    for decode in (lambda: generate(model, idx, 10**12, num_beams=2),
                   lambda: next(stream(model, idx, 10**12, top_p=0.9, num_samples=2)),
                   lambda: generate(model, idx, 10**12, penalty_alpha=0.6, top_k=2)):
        with pytest.raises(UserError, match=message):
            decode()
    assert model.training  # left as it was


def test_contrastive_top_k_larger_than_the_vocabulary():
    torch.manual_seed(1)
    model = GPT(GPTConfig(block_size=16, vocab_size=11, n_layer=1, n_head=2, n_embd=16)).eval()
    out = generate(model, torch.tensor([[1, 2, 3]]), 5, penalty_alpha=0.5, top_k=20)
    assert out.shape == (1, 8) and int(out.max()) < 11


def test_rows_stop_at_eos(models):
    _, ours = models
    free = generate(ours, torch.tensor([PROMPTS[1]]), 10, temperature=0)[0].tolist()
    eos = free[4 + 3]  # the 4th generated token
    first = free[4:].index(eos)
    out = generate(ours, torch.tensor([PROMPTS[1]]), 10, temperature=0, eos_token_id=eos)[0].tolist()
    assert out == free[: 4 + first + 1]  # stops right after eos
    idx, mask = pad_sequences([PROMPTS[1], PROMPTS[0]], pad_id=0)
    both = generate(ours, idx, 10, temperature=0, eos_token_id=eos, attention_mask=mask)
    row = both[0, idx.size(1):].tolist()
    assert row[: first + 1] == free[4 : 4 + first + 1] and set(row[first:]) == {eos}  # filled with eos


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(top_p=0.0), "top_p must be in (0, 1]"),
        (dict(top_p=1.5), "top_p must be in (0, 1]"),
        (dict(top_k=0), "top_k must be >= 1"),
        (dict(temperature=-1.0), "temperature must be >= 0"),
        (dict(penalty_alpha=1.5, top_k=4), "penalty_alpha must be in [0, 1]"),
        (dict(min_p=2.0), "min_p must be in [0, 1]"),
        (dict(repetition_penalty=0.0), "repetition_penalty must be > 0"),
        (dict(num_beams=0), "num_beams must be >= 1"),
        (dict(num_beams=4, top_p=0.9), "beam search (num_beams > 1) does not sample"),
        (dict(num_beams=4, penalty_alpha=0.6, top_k=4), "beam search (num_beams > 1) does not sample"),
        (dict(num_beams=2, early_stopping="sometimes"), "early_stopping must be true, false or never"),
    ],
)
def test_bad_settings_are_clear_errors(models, kwargs, message):
    _, ours = models
    with pytest.raises(UserError, match=re.escape(message)):
        generate(ours, torch.tensor([[1, 2]]), 5, **kwargs)
    with pytest.raises(UserError, match="max_new_tokens must be at least 1"):
        generate(ours, torch.tensor([[1, 2]]), 0)


def test_beam_search_cannot_stream_and_returns_at_most_num_beams(models):
    _, ours = models
    with pytest.raises(UserError, match="beam search chooses its text only at the end"):
        next(stream(ours, torch.tensor([[1, 2]]), 5, num_beams=2))
    with pytest.raises(UserError, match="at most num_beams"):
        generate(ours, torch.tensor([[1, 2]]), 5, num_beams=2, num_samples=3)
