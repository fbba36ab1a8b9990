"""The GPT model: config checks, causality, loss, vocabulary padding, KV cache,
padding masks, hidden states, initialisation, parameter/FLOP counts, MFU."""

import math

import pytest
import torch
import torch.nn.functional as F

from gpt import GPT, GPTConfig, UserError
from gpt.attention import CausalSelfAttention, Linear
from gpt.model import pad_sequences
from gpt.system import peak_bf16_flops

SMALL = dict(block_size=32, vocab_size=97, n_layer=3, n_head=4, n_embd=32)
# GPT-2 and the architecture switches, in combinations: every test marked with
# @ARCHITECTURES runs on each (the ALiBi one has 6 heads, not a power of two).
ARCHITECTURES = pytest.mark.parametrize("arch", [
    {},
    dict(position="sinusoidal", norm="rmsnorm"),
    dict(position="rope", n_kv_head=2),
    dict(position="alibi", n_head=6, n_embd=48, attention_window=5),
    dict(position="none", norm_position="post"),
    dict(position="rope", attention_window=4, n_kv_head=1, norm="rmsnorm", norm_position="post"),
    dict(attention="linear"),
    dict(attention="linear", position="sinusoidal", norm_position="post"),
    dict(attention="synthesizer_dense"),
    dict(attention="synthesizer_random", position="none", attention_window=6),
    dict(attention="synthesizer_random_fixed", attention_pattern="dilated", attention_stride=2),
    dict(attention="synthesizer_random+softmax", attention_scale="logn"),
    dict(block="gau", position="rope"),
    dict(block="gau", attention_pattern="strided", attention_stride=3, attention_window=4, norm_position="post"),
    dict(position="rope", attention_scale="logn", attention_window=6),
    dict(position="alibi", attention_scale="one", attention_pattern="strided", attention_stride=3),
], ids=["gpt2", "sinusoidal-rmsnorm", "rope-gqa", "alibi6-window", "none-postnorm", "rope-window-mqa-post-rms",
        "linear", "linear-sinusoidal-post", "synth-dense", "synth-random-window", "synth-fixed-dilated",
        "synth-random+softmax-logn", "gau-rope", "gau-strided-post", "rope-logn-window", "alibi-unscaled-strided"])


def small_model(seed=0, **overrides) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**SMALL, **overrides}))
    # Random LayerNorm parameters and biases, so the tests also exercise them.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def all_logits(model, idx, **kw):
    return model.logits(model.hidden_states(idx, **kw))


# ---- configuration -----------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(n_embd=30, n_head=4), "divisible by n_head"),
        (dict(n_layer=0), "n_layer must be a positive integer"),
        (dict(block_size=-5), "block_size must be a positive integer"),
        (dict(vocab_size=2.5), "vocab_size must be a positive integer"),
        (dict(n_head=True), "n_head must be a positive integer"),
        (dict(dropout=1.0), "dropout must be in [0, 1)"),
    ],
)
def test_bad_config_is_a_clear_error(overrides, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace(")", r"\)")):
        GPTConfig(**{**SMALL, **overrides})


def test_sequence_longer_than_block_size_is_a_clear_error():
    model = small_model()
    with pytest.raises(UserError, match="longer than the model's block_size"):
        model(torch.zeros(1, SMALL["block_size"] + 1, dtype=torch.long))
    cache = model.new_kv_cache(1)
    model(torch.zeros(1, SMALL["block_size"], dtype=torch.long), kv_cache=cache)
    with pytest.raises(UserError, match="block_size"):
        model(torch.zeros(1, 1, dtype=torch.long), kv_cache=cache)


# ---- forward ------------------------------------------------------------------------


@ARCHITECTURES
def test_causality_future_tokens_do_not_change_earlier_logits(arch):
    model = small_model(**arch)
    idx = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(1))
    changed = idx.clone()
    changed[:, 12] = (changed[:, 12] + 1) % 97
    a, b = all_logits(model, idx), all_logits(model, changed)
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=0)
    assert (a[:, 12:] - b[:, 12:]).abs().amax() > 1e-3  # the change is seen from position 12 on


def test_loss_is_mean_cross_entropy_over_targets_not_minus_one():
    model = small_model()
    g = torch.Generator().manual_seed(2)
    idx = torch.randint(0, 97, (3, 16), generator=g)
    targets = torch.randint(0, 97, (3, 16), generator=g)
    targets[0, :5] = -1
    targets[2, 10:] = -1
    logits, loss = model(idx, targets)
    keep = targets != -1
    expected = -torch.log_softmax(logits[keep].double(), -1).gather(1, targets[keep][:, None]).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_all_targets_ignored_gives_zero_loss_not_nan():
    model = small_model().train()
    idx = torch.randint(0, 97, (2, 8))
    _, loss = model(idx, torch.full_like(idx, -1))
    loss.backward()
    assert loss.item() == 0.0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@ARCHITECTURES
def test_no_targets_gives_only_the_last_positions_logits(arch):
    model = small_model(**arch)
    idx = torch.randint(0, 97, (2, 10))
    last, loss = model(idx)
    assert loss is None and last.shape == (2, 1, 97)
    full, _ = model(idx, torch.zeros_like(idx))
    torch.testing.assert_close(last, full[:, -1:], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(last, all_logits(model, idx)[:, -1:], rtol=1e-5, atol=1e-6)


def test_vocabulary_padding_never_shows_and_changes_nothing():
    padded = small_model(vocab_multiple=64)  # 97 -> 128 rows
    plain = GPT(GPTConfig(**SMALL, vocab_multiple=1)).eval()
    assert padded.transformer.wte.weight.shape[0] == 128 and plain.transformer.wte.weight.shape[0] == 97
    state = padded.state_dict()
    state["transformer.wte.weight"] = state["lm_head.weight"] = state["transformer.wte.weight"][:97]
    plain.load_state_dict(state)

    g = torch.Generator().manual_seed(3)
    idx, targets = torch.randint(0, 97, (2, 16), generator=g), torch.randint(0, 97, (2, 16), generator=g)
    logits_p, loss_p = padded(idx, targets)
    logits_u, loss_u = plain(idx, targets)
    assert logits_p.shape == (2, 16, 97)
    torch.testing.assert_close(logits_p, logits_u, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss_p, loss_u, rtol=1e-6, atol=1e-6)
    loss_p.backward()
    loss_u.backward()
    grad_p = padded.transformer.wte.weight.grad
    torch.testing.assert_close(grad_p[:97], plain.transformer.wte.weight.grad, rtol=1e-5, atol=1e-7)
    assert grad_p[97:].abs().max() == 0  # padding rows get no gradient
    assert padded(idx)[0].shape == (2, 1, 97)


def test_hidden_states_are_post_final_layernorm_and_give_the_logits():
    model = small_model()
    idx = torch.randint(0, 97, (2, 12))
    h = model.hidden_states(idx)
    assert h.shape == (2, 12, 32)
    # LayerNorm output normalised by the final LayerNorm's affine parameters
    ln = model.transformer.ln_f
    z = (h - ln.bias) / ln.weight
    torch.testing.assert_close(z.mean(-1), torch.zeros(2, 12), atol=1e-4, rtol=0)
    torch.testing.assert_close(model.logits(h), model(idx, torch.zeros_like(idx))[0], rtol=1e-5, atol=1e-5)


def reference_attend(self, q, k, v, attn_mask):
    """Plain softmax(q kᵀ/√D + mask) v (no 1/√D with attention_scale = "one"), with causal
    masking aligned to the last keys."""
    T, S = q.size(2), k.size(2)
    scores = (q @ k.transpose(-2, -1)) / (1.0 if self.scale == "one" else math.sqrt(q.size(-1)))
    if attn_mask is not None and attn_mask.is_floating_point():  # ALiBi: a bias, -inf where hidden
        return (scores + attn_mask).softmax(-1) @ v
    allowed = torch.ones(T, S, dtype=torch.bool).tril(S - T) if attn_mask is None else attn_mask
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v


@ARCHITECTURES
def test_sdpa_attention_equals_plain_reference(monkeypatch, arch):
    model = small_model(**arch)
    idx = torch.randint(0, 97, (3, 14))
    mask = torch.ones(3, 14, dtype=torch.long)
    mask[1, :4] = 0
    fast_full, fast_masked = all_logits(model, idx), all_logits(model, idx, attention_mask=mask)
    monkeypatch.setattr(CausalSelfAttention, "attend", reference_attend)
    torch.testing.assert_close(fast_full, all_logits(model, idx), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast_masked, all_logits(model, idx, attention_mask=mask), rtol=1e-5, atol=1e-5)


# ---- KV cache ----------------------------------------------------------------------


@ARCHITECTURES
def test_kv_cache_prefill_then_single_tokens_equals_full_forward(arch):
    model = small_model(**arch)
    seq = torch.randint(0, 97, (3, 20), generator=torch.Generator().manual_seed(4))
    full = all_logits(model, seq)
    cache = model.new_kv_cache(3)
    with torch.no_grad():
        logits, _ = model(seq[:, :6], kv_cache=cache)
        torch.testing.assert_close(logits[:, 0], full[:, 5], rtol=1e-5, atol=1e-5)
        for t in range(6, 20):
            logits, _ = model(seq[:, t : t + 1], kv_cache=cache)
            torch.testing.assert_close(logits[:, 0], full[:, t], rtol=1e-5, atol=1e-5)
    assert cache.length == 20 and cache.capacity == SMALL["block_size"]  # preallocated


@ARCHITECTURES
def test_kv_cache_chunks_longer_than_one_token(arch):
    model = small_model(**arch)
    seq = torch.randint(0, 97, (2, 17))
    full = all_logits(model, seq)
    cache = model.new_kv_cache(2)
    with torch.no_grad():
        chunks = [model.hidden_states(seq[:, a:b], kv_cache=cache) for a, b in [(0, 5), (5, 9), (9, 10), (10, 17)]]
    torch.testing.assert_close(model.logits(torch.cat(chunks, 1)), full, rtol=1e-5, atol=1e-5)


@ARCHITECTURES
def test_kv_cache_repeat_and_select_rows(arch):
    model = small_model(**arch)
    g = torch.Generator().manual_seed(5)
    prompts = torch.randint(0, 97, (2, 7), generator=g)
    cache = model.new_kv_cache(2)
    with torch.no_grad():
        model(prompts, kv_cache=cache)
        cache.repeat_rows(3)  # rows: p0, p0, p0, p1, p1, p1
        # slots not yet written are zeros (a static cache reads them, masked: 0 x garbage could be NaN)
        assert all(t[:, :, :, cache.length :].abs().max() == 0 for t in (cache.k, cache.v) if t is not None and t.numel())
        seqs = prompts.repeat_interleave(3, 0)
        for _ in range(3):
            nxt = torch.randint(0, 97, (6, 1), generator=g)
            logits, _ = model(nxt, kv_cache=cache)
            seqs = torch.cat([seqs, nxt], 1)
            torch.testing.assert_close(logits[:, 0], all_logits(model, seqs)[:, -1], rtol=1e-5, atol=1e-5)
        keep = [5, 0, 0, 3]
        cache.select_rows(keep)
        seqs = seqs[keep]
        for _ in range(3):
            nxt = torch.randint(0, 97, (4, 1), generator=g)
            logits, _ = model(nxt, kv_cache=cache)
            seqs = torch.cat([seqs, nxt], 1)
            torch.testing.assert_close(logits[:, 0], all_logits(model, seqs)[:, -1], rtol=1e-5, atol=1e-5)
    assert cache.batch_size == 4


@ARCHITECTURES
def test_static_cache_and_candidate_slots_equal_full_forward(arch):
    """The decoding step as it is compiled: attention reads every slot of a static cache (the
    empty ones masked out), and k candidates for a row's next token share the row's cache,
    each seeing the row and itself; the kept candidate is then part of the row."""
    model = small_model(**arch)
    g = torch.Generator().manual_seed(6)
    rows = [[5, 6, 7, 8, 9, 10, 11], [12, 13]]
    idx, mask = pad_sequences(rows)  # left-padded
    cache = model.new_kv_cache(2, length=24)

    def alone(r, tokens):  # the last position's logits of row r followed by tokens, without a cache
        return all_logits(model, torch.tensor([rows[r] + tokens]))[0, -1]

    with torch.no_grad():
        model.hidden_states(idx, attention_mask=mask, kv_cache=cache)
        cache.static = True
        for _ in range(4):
            candidates = torch.randint(0, 97, (2, 3), generator=g)
            h = model.decode(candidates, *cache.claim_candidates(3), cache)  # (2, 3, C)
            for r in range(2):
                for c in range(3):
                    torch.testing.assert_close(model.logits(h[r, c]), alone(r, [int(candidates[r, c])]),
                                               rtol=1e-5, atol=1e-5)
            chosen = torch.randint(0, 3, (2,), generator=g)
            cache.keep_candidate(chosen)
            for r in range(2):
                rows[r].append(int(candidates[r, chosen[r]]))
            nxt = torch.randint(0, 97, (2, 1), generator=g)
            h = model.decode(nxt, *cache.claim(1), cache)
            for r in range(2):
                torch.testing.assert_close(model.logits(h[r, 0]), alone(r, [int(nxt[r])]), rtol=1e-5, atol=1e-5)
                rows[r].append(int(nxt[r]))
    assert cache.length == 7 + 4 * 2 and cache.capacity == 24


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 40), (1, 1, 40), (2, 40), (1, 3, 40), (4, 1, 40), (5, 40), (2, 7, 40)])
def test_linear_equals_f_linear_for_any_number_of_rows(shape, bias):
    """Linear's CPU product for 1-4 rows (W xᵀ) equals nn.Linear's, gradients included."""
    torch.manual_seed(0)
    layer = Linear(40, 24, bias=bias)
    x = torch.randn(shape, requires_grad=True)
    out = layer(x)
    reference = F.linear(x, layer.weight, layer.bias)
    assert out.shape == (*shape[:-1], 24) and out.is_contiguous()
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(out.square().sum(), [x, layer.weight])
    for got, expected in zip(grads, torch.autograd.grad(reference.square().sum(), [x, layer.weight])):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the same output dtype as nn.Linear under autocast
        assert layer(x).dtype == F.linear(x, layer.weight, layer.bias).dtype == torch.bfloat16


@ARCHITECTURES
def test_padded_prefill_then_select_then_padded_chunk(arch):
    """The riskiest cache path: padding remembered across select_rows and a later padded chunk."""
    model = small_model(**arch)
    g = torch.Generator().manual_seed(8)
    rows = [torch.randint(0, 97, (n,), generator=g) for n in (2, 5, 4)]
    idx, mask = torch.zeros(3, 5, dtype=torch.long), torch.zeros(3, 5, dtype=torch.long)
    for i, r in enumerate(rows):
        idx[i, 5 - len(r) :], mask[i, 5 - len(r) :] = r, 1
    cache = model.new_kv_cache(3)
    with torch.no_grad():
        model(idx, attention_mask=mask, kv_cache=cache)
        keep = [2, 0, 0]
        cache.select_rows(keep)
        chunk = torch.randint(0, 97, (3, 3), generator=g)
        chunk_mask = torch.tensor([[1, 1, 1], [0, 1, 1], [1, 0, 1]])  # padding inside a later chunk
        h_chunk = model.hidden_states(chunk, attention_mask=chunk_mask, kv_cache=cache)
        step = torch.randint(0, 97, (3, 1), generator=g)
        h_step = model.hidden_states(step, kv_cache=cache)
    for j, i in enumerate(keep):
        real_chunk = chunk[j][chunk_mask[j].bool()]
        alone = torch.cat([rows[i], real_chunk, step[j]])[None]
        h = model.hidden_states(alone)[0]
        n = len(rows[i])
        torch.testing.assert_close(h_chunk[j][chunk_mask[j].bool()], h[n : n + len(real_chunk)], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(h_step[j, 0], h[-1], rtol=1e-5, atol=1e-5)


@ARCHITECTURES
def test_bfloat16_cache_serves_a_float32_model(arch):
    model = small_model(**arch)
    seq = torch.randint(0, 97, (2, 12))
    cache = model.new_kv_cache(2, dtype=torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in cache.tensors()[:-1])  # all but the position ids
    with torch.no_grad():
        model(seq[:, :-1], kv_cache=cache)
        logits, _ = model(seq[:, -1:], kv_cache=cache)
    torch.testing.assert_close(logits[:, 0], all_logits(model, seq)[:, -1], rtol=0.05, atol=0.05)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kv_cache_nbytes_is_what_a_cache_allocates(dtype):
    from gpt.attention import KVCache

    model = small_model(n_kv_head=2)
    cache = model.new_kv_cache(3, dtype=dtype, length=20, spare=4)  # spare slots count too
    allocated = sum(t.untyped_storage().nbytes() for t in (cache.k, cache.v, cache.pos))
    assert KVCache.nbytes(model.config, 3, 24, dtype) == allocated and cache.capacity == 24


def test_mask_and_cache_shapes_are_checked():
    model = small_model()
    idx = torch.randint(0, 97, (2, 6))
    with pytest.raises(UserError, match="the mask covers the new tokens only"):
        model(idx, attention_mask=torch.ones(2, 9))
    with pytest.raises(UserError, match="the KV cache holds 3 rows but idx has 2"):
        model(idx, kv_cache=model.new_kv_cache(3))


@ARCHITECTURES
def test_left_padded_batch_equals_each_row_alone_with_and_without_cache(arch):
    model = small_model(**arch)
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(0, 97, (n,), generator=g) for n in (3, 9, 6)]
    width = max(len(p) for p in prompts)
    idx = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        idx[i, width - len(p) :], mask[i, width - len(p) :] = p, 1
    continuation = torch.randint(0, 97, (3, 4), generator=g)
    batch_h = model.hidden_states(idx, attention_mask=mask)
    cache = model.new_kv_cache(3)
    with torch.no_grad():
        model(idx, attention_mask=mask, kv_cache=cache)
        steps = [model(continuation[:, t : t + 1], kv_cache=cache)[0][:, 0] for t in range(4)]
    for i, p in enumerate(prompts):
        alone = torch.cat([p, continuation[i]])[None]
        h = model.hidden_states(alone)
        torch.testing.assert_close(batch_h[i, width - len(p) :], h[0, : len(p)], rtol=1e-5, atol=1e-5)
        expected = model.logits(h)[0, len(p) :]
        torch.testing.assert_close(torch.stack([s[i] for s in steps]), expected, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(batch_h).all()  # padding rows too: no NaN from empty softmax rows


# ---- initialisation, size, FLOPs, MFU ------------------------------------------------


def test_gpt2_initialisation():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=8, n_head=4, n_embd=256, block_size=64, vocab_size=1000))
    block = model.transformer.h[3]
    assert block.attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert block.mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
    scaled = 0.02 / math.sqrt(2 * 8)
    assert block.attn.c_proj.weight.std().item() == pytest.approx(scaled, rel=0.05)
    assert block.mlp.c_proj.weight.std().item() == pytest.approx(scaled, rel=0.05)
    assert model.transformer.wte.weight[:1000].std().item() == pytest.approx(0.02, rel=0.05)
    assert block.attn.c_attn.bias.abs().max() == 0
    assert model.lm_head.weight is model.transformer.wte.weight


def test_parameter_count_of_gpt2_124m_equals_transformers():
    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):  # shapes only: no memory, no init time
        ours = GPT(GPTConfig())  # GPT-2 small, vocabulary padded to 50304
        theirs = transformers.GPT2LMHeadModel(transformers.GPT2Config())
    n_theirs = sum(p.numel() for p in theirs.parameters())
    assert ours.num_params() == n_theirs == 124_439_808
    assert ours.num_params(non_embedding=True) == n_theirs - 1024 * 768
    N, L, H, Q, T = ours.num_params(non_embedding=True), 12, 12, 64, 1024
    assert ours.flops_per_token() == 6 * N + 12 * L * H * Q * T
    assert ours.flops_per_token(seq_len=256) == 6 * N + 12 * L * H * Q * 256


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA H200 NVL", 835e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA A100 80GB PCIe", 312e12),
        ("NVIDIA GeForce RTX 3090", None),
        ("NVIDIA A10G", None),
    ],
)
def test_peak_flops_table(name, peak):
    assert peak_bf16_flops(name) == peak


def test_mfu_is_none_where_the_peak_is_unknown():
    assert small_model().estimate_mfu(1e5, "cpu") is None


def test_mfu_arithmetic(monkeypatch):
    import gpt.model

    model = small_model()
    monkeypatch.setattr(gpt.model, "device_peak_flops", lambda device: 989e12)  # as on an H100 SXM
    mfu = model.estimate_mfu(2e6, "cuda", seq_len=16)
    assert mfu == pytest.approx(model.flops_per_token(16) * 2e6 / 989e12)
    assert 0 < mfu < 1


def test_a_tiny_model_learns_a_fixed_batch():
    model = small_model(seed=1).train()
    idx = torch.randint(0, 97, (4, 32), generator=torch.Generator().manual_seed(7))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(97), abs=0.5)
    assert losses[-1] < 0.5 * losses[0]


def test_dropout_is_active_in_training_only():
    model = small_model(dropout=0.5)
    idx = torch.randint(0, 97, (2, 10))
    torch.testing.assert_close(all_logits(model, idx), all_logits(model, idx))
    model.train()
    assert not torch.allclose(all_logits(model, idx), all_logits(model, idx))


@ARCHITECTURES
@pytest.mark.parametrize("bias, vocab_multiple", [(True, 64), (False, 1)])
def test_parameter_count_is_what_the_model_allocates(bias, vocab_multiple, arch):
    """The memory check before allocating relies on it (train.py refuses a model too large)."""
    shape = dict(block_size=24, vocab_size=101, n_layer=3, n_head=2, n_embd=16)
    config = GPTConfig(**{**shape, **arch, "bias": bias, "vocab_multiple": vocab_multiple})
    assert config.parameter_count() == sum(p.numel() for p in GPT(config).parameters())
