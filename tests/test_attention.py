"""gpt/attention.py's mechanisms (linear attention, the Synthesizers, the GAU), scales (1, log n)
and sparse patterns, each against a reference written here from the definitions: explicit
T x T matrices, a token-by-token loop for linear attention's recurrence, the GAU's formula line
by line. (tests/test_model.py runs its KV-cache, padding, candidate-slot and parameter-count
tests on these switches too; tests/test_architecture.py generation of padded batches.)"""

import math

import pytest
import torch
import torch.nn.functional as F

from gpt import GPT, GPTConfig, UserError
from gpt.attention import GAU_KEY_DIM, LinearAttention
from gpt.positions import apply_rope, rope_angles

SHAPE = dict(block_size=16, vocab_size=61, n_layer=2, n_head=4, n_embd=32)


def model_with(seed=0, **arch) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**SHAPE, **arch}))
    with torch.no_grad():  # non-trivial norms, biases and GAU offsets, so the reference must get them right
        for name, p in model.named_parameters():
            if name.endswith(("bias", "mix")) or ".beta_" in name or ".gamma_" in name or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def visible_keys(c: GPTConfig, T: int) -> torch.Tensor:
    """(T, T): key j visible to query i, from the definitions of the window and the patterns."""
    N, k = c.attention_window, c.attention_stride
    visible = torch.zeros(T, T, dtype=torch.bool)
    for i in range(T):
        for j in range(i + 1):
            d = i - j
            if c.attention_pattern == "dense":
                visible[i, j] = not N or d < N
            else:
                every_kth = d % k == 0 and (not N or d < N * k)
                visible[i, j] = every_kth or (c.attention_pattern == "strided" and d < k)
    return visible


def reference_logits(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """The model's function for one sequence from position 0, written out from the papers."""
    c = model.config
    T, C, H, D, N = idx.size(1), c.n_embd, c.n_head, c.head_dim, c.block_size
    visible = visible_keys(c, T)
    n = visible.sum(-1, keepdim=True).float()  # keys each query sees
    x = model.transformer.wte(idx[0])
    if c.position == "learned":
        x = x + model.transformer.wpe.weight[:T]
    for block in model.transformer.h:
        att = block.attn
        a = x if c.norm_position == "post" else block.ln_1(x)
        if c.block == "gau":
            u, v = F.silu(a @ att.c_uv.weight.T + att.c_uv.bias).split(2 * C, -1)
            z = F.silu(a @ att.c_z.weight.T + att.c_z.bias)
            q, k = z * att.gamma_q + att.beta_q, z * att.gamma_k + att.beta_k
            if c.position == "rope":
                cos, sin = rope_angles(torch.arange(T), GAU_KEY_DIM, c.rope_base)
                q, k = apply_rope(q[None], cos, sin)[0], apply_rope(k[None], cos, sin)[0]
            A = torch.relu(q @ k.T / math.sqrt(GAU_KEY_DIM)) ** 2 * visible / n
            y = (u * (A @ v)) @ att.c_proj.weight.T + att.c_proj.bias
        else:
            qkv = att.c_attn(a)
            if c.attention == "linear":
                q, k, v = (t.view(T, H, D) for t in qkv.split(C, -1))
                phi = lambda t: torch.where(t > 0, t + 1, torch.exp(t))  # elu(t) + 1
                y = torch.zeros(T, H, D)
                for h in range(H):  # the recurrence, one token at a time
                    S, s = torch.zeros(D, D), torch.zeros(D)
                    for t in range(T):
                        S = S + torch.outer(phi(k[t, h]), v[t, h])
                        s = s + phi(k[t, h])
                        y[t, h] = phi(q[t, h]) @ S / (phi(q[t, h]) @ s)
            else:
                if c.attention in ("softmax", "synthesizer_random+softmax"):
                    q, k, v = (t.view(T, H, D).transpose(0, 1) for t in qkv.split(C, -1))
                    if c.position == "rope":
                        q, k = apply_rope(q, *rope_angles(torch.arange(T), D, c.rope_base)), apply_rope(k, *rope_angles(torch.arange(T), D, c.rope_base))
                    scale = 1.0 if c.attention_scale == "one" else 1 / math.sqrt(D)
                    if c.attention_scale == "logn":
                        scale = scale * torch.log(n) / math.log(N)  # per query
                    scores = q @ k.transpose(-2, -1) * scale
                else:
                    v = qkv.view(T, H, D).transpose(0, 1)
                if c.attention == "synthesizer_dense":  # row i: query i's logits over key positions 0..N-1
                    logits = torch.relu(a @ att.c_dense.weight.T + att.c_dense.bias) @ att.c_logits.weight.T + att.c_logits.bias
                    scores = logits.view(T, H, N).transpose(0, 1)[:, :, :T]
                if c.attention.startswith("synthesizer_random"):
                    R = att.random[:, :T, :T]
                    if c.attention == "synthesizer_random+softmax":
                        alpha = torch.sigmoid(att.mix)[:, None, None]
                        scores = alpha * R + (1 - alpha) * scores
                    else:
                        scores = R
                y = scores.masked_fill(~visible, float("-inf")).softmax(-1) @ v
                y = y.transpose(0, 1)
            y = att.c_proj(y.reshape(T, C))
        x = block.ln_1(x + y) if c.norm_position == "post" else x + y
        if c.block == "transformer":
            m = block.mlp(x if c.norm_position == "post" else block.ln_2(x))
            x = block.ln_2(x + m) if c.norm_position == "post" else x + m
    return model.logits(model.transformer.ln_f(x))[None]


SWITCHES = [
    dict(attention="linear"),
    dict(attention="linear", position="none", norm_position="post"),
    dict(attention="synthesizer_dense"),
    dict(attention="synthesizer_random"),
    dict(attention="synthesizer_random_fixed", attention_window=5),
    dict(attention="synthesizer_random+softmax"),
    dict(attention="synthesizer_random+softmax", position="rope"),
    dict(attention="synthesizer_random+softmax", attention_scale="logn", attention_pattern="dilated", attention_stride=2),
    dict(block="gau"),
    dict(block="gau", position="rope", norm_position="post", attention_pattern="strided", attention_stride=3),
    dict(attention_scale="one"),
    dict(attention_scale="logn", position="rope"),
    dict(attention_scale="logn", attention_window=4),
    dict(attention_pattern="dilated", attention_stride=3),
    dict(attention_pattern="dilated", attention_stride=2, attention_window=3),
    dict(attention_pattern="strided", attention_stride=4),
    dict(attention_pattern="strided", attention_stride=3, attention_window=2, position="rope"),
]


@pytest.mark.parametrize("arch", SWITCHES, ids=lambda a: "-".join(f"{k}={v}" for k, v in a.items()))
def test_model_equals_the_reference_forward(arch):
    model = model_with(**arch)
    idx = torch.randint(0, 61, (1, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model.logits(model.hidden_states(idx)), reference_logits(model, idx),
                                   rtol=1e-4, atol=1e-4)
        probs = model.attention_probabilities(idx)  # the inspection path, for every mechanism
    assert probs.shape[:2] == (2, 1) and probs.shape[-2:] == (13, 13)
    hidden = ~visible_keys(model.config, 13)
    assert probs[..., hidden].abs().max() == 0  # nothing on keys the mask hides
    if model.config.block == "transformer":  # weights that sum to 1 (the GAU's relu² rows do not)
        torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))


def test_sparse_patterns_keep_the_keys_they_name():
    """Query 11's keys, listed by hand."""
    def keys(**arch):
        model = model_with(**arch)
        pos = torch.arange(12)[None]
        return set(model.attention_mask(pos, pos, torch.arange(12))[0, 0, 11].nonzero().flatten().tolist())

    assert keys(attention_pattern="dilated", attention_stride=3) == {11, 8, 5, 2}
    assert keys(attention_pattern="dilated", attention_stride=3, attention_window=2) == {11, 8}
    assert keys(attention_pattern="strided", attention_stride=3) == {11, 10, 9, 8, 5, 2}
    assert keys(attention_pattern="strided", attention_stride=3, attention_window=2) == {11, 10, 9, 8}
    assert keys(attention_window=3) == {11, 10, 9}


def test_log_n_scaling_is_one_at_the_training_length():
    """The last query of a full block sees block_size keys: log n / log block_size = 1, so its
    output is that of plain 1/sqrt(D) attention with the same weights; earlier queries, which see
    fewer keys, get flatter attention. (One layer: later layers would mix in earlier positions.)"""
    plain, logn = model_with(n_layer=1), model_with(n_layer=1, attention_scale="logn")
    for model in (plain, logn):  # sharp attention, so that the scale shows
        model.transformer.h[0].attn.c_attn.weight.data *= 20
    idx = torch.randint(0, 61, (2, 16))
    with torch.no_grad():
        a, b = plain.hidden_states(idx), logn.hidden_states(idx)
    torch.testing.assert_close(a[:, -1], b[:, -1])
    assert not torch.allclose(a[:, 1:8], b[:, 1:8], atol=1e-2)


def test_linear_attention_in_chunks_equals_the_recurrence_with_padding_and_a_carried_state():
    torch.manual_seed(3)
    B, H, T, D = 2, 3, 150, 8  # three chunks of 64
    phi_q, phi_k = F.elu(torch.randn(B, H, T, D)) + 1, F.elu(torch.randn(B, H, T, D)) + 1
    v = torch.randn(B, H, T, D)
    real = torch.ones(B, 1, T, 1)
    real[1, :, :5] = 0  # row 1: five padding tokens first
    S0, z0 = torch.rand(B, H, D, D), torch.rand(B, H, D)  # a state carried in from earlier tokens
    visible = torch.ones(T, T, dtype=torch.bool).tril()[None, None] & real.bool().transpose(-2, -1)
    visible |= torch.eye(T, dtype=torch.bool)  # padding sees itself only
    out = LinearAttention.chunks(phi_q, phi_k, v, visible, real, (S0, z0))
    for b in range(B):
        S, z = S0[b].clone(), z0[b].clone()
        for t in range(T):
            if real[b, 0, t, 0]:
                S, z = S + phi_k[b, :, t, :, None] * v[b, :, t, None, :], z + phi_k[b, :, t]
                expected = (phi_q[b, :, t, None] @ S)[:, 0] / (phi_q[b, :, t] * z).sum(-1, keepdim=True)
                torch.testing.assert_close(out[b, :, t], expected, rtol=1e-5, atol=1e-5)


def test_linear_attention_decodes_with_a_state_that_does_not_grow():
    model = model_with(attention="linear", position="none")
    cache = model.new_kv_cache(2, length=1000)
    assert cache.k is None and cache.S.shape == (2, 2, 4, 8, 8) and cache.z.shape == (2, 2, 4, 8)
    state = model.config.n_layer * 4 * 8 * 9 * 4  # bytes per row: S and z, fp32
    assert cache.nbytes(model.config, 1, 1000) - cache.nbytes(model.config, 1, 10) == 990 * 8  # position ids only
    assert cache.nbytes(model.config, 1, 0) == state
    idx = torch.randint(0, 61, (2, 40))  # past block_size: position "none" reads any length
    with torch.no_grad():
        full = model.hidden_states(idx)
        model.hidden_states(idx[:, :25], kv_cache=cache)
        steps = [model.hidden_states(idx[:, t : t + 1], kv_cache=cache) for t in range(25, 40)]
    torch.testing.assert_close(torch.cat(steps, 1), full[:, 25:], rtol=1e-5, atol=1e-5)


def test_a_synthesizer_reads_at_most_block_size_and_keeps_it():
    model = model_with(attention="synthesizer_random")
    assert model.max_context() == 16
    with pytest.raises(UserError, match="Synthesizer's position weights stop there"):
        model.hidden_states(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(UserError, match="Synthesizer's position weights, block_size = 16"):
        model.new_kv_cache(1, length=40)
    with pytest.raises(UserError, match="a Synthesizer's weights have one row or column per position"):
        model.set_block_size(8)
    assert not model_with(attention="synthesizer_dense", position="none").config.extrapolates


def test_a_fixed_synthesizer_never_trains_its_matrix_and_saves_it():
    model = model_with(attention="synthesizer_random_fixed").train()
    R = model.transformer.h[0].attn.random
    assert not R.requires_grad and "transformer.h.0.attn.random" in model.state_dict()
    assert R.std() > 0.5  # a random pattern, N(0, 1), not near-uniform attention
    idx = torch.randint(0, 61, (2, 16))
    model(idx, targets=idx)[1].backward()
    assert R.grad is None and all(p.grad is not None for p in model.parameters())


def test_gau_layer_is_one_unit_with_the_papers_widths():
    from gpt.config import OptimConfig
    from gpt.optim import make_optimizers

    model = model_with(block="gau")
    block = model.transformer.h[0]
    assert not hasattr(block, "mlp") and not hasattr(block, "ln_2")
    decayed = make_optimizers(model, OptimConfig(), torch.device("cpu"))[0].param_groups[0]["params"]
    assert not any(p is block.attn.gamma_q or p is block.attn.beta_k for p in decayed)  # vectors: no weight decay
    assert block.attn.c_uv.weight.shape == (4 * 32, 32) and block.attn.c_z.weight.shape == (GAU_KEY_DIM, 32)
    assert block.attn.c_proj.weight.shape == (32, 2 * 32)
    cache = model.new_kv_cache(1)
    assert cache.k.shape == (2, 1, 1, 16, GAU_KEY_DIM) and cache.v.shape == (2, 1, 1, 16, 64)
    # one head of attention weights, whatever n_head says (gpt.inspect draws config.attention_heads)
    assert model.config.attention_heads == 1
    assert model.attention_probabilities(torch.randint(0, 61, (2, 5))).shape == (2, 2, 1, 5, 5)


def test_linear_attention_under_bf16_autocast_stays_finite_and_close_to_fp32():
    """elu(x) + 1 for very negative x is exp(x); computed in bf16 as expm1 + 1 it rounds to 0,
    and a query whose visible keys all round to 0 divides by zero. φ is exp(x) there, and linear
    attention runs in fp32 under autocast."""
    assert (LinearAttention.feature(torch.tensor([-7.0, -9.0, -12.0], dtype=torch.bfloat16)) > 0).all()
    model = model_with(attention="linear")
    for block in model.transformer.h:
        block.attn.c_attn.weight.data *= 40  # queries and keys far below zero in places
    idx = torch.randint(0, 61, (2, 16))
    with torch.no_grad():
        exact = model.hidden_states(idx)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            rounded = model.hidden_states(idx)
    assert torch.isfinite(rounded).all()
    torch.testing.assert_close(rounded.float(), exact, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("arch", [dict(attention="linear"), dict(attention="synthesizer_dense"), dict(block="gau")],
                         ids=["linear", "synth-dense", "gau"])
def test_classifier_pooling_is_the_same_with_left_or_right_padding(arch):
    from gpt.model import GPTClassifier, pad_sequences

    torch.manual_seed(0)
    model = GPTClassifier(model_with(**arch), 3).eval()
    texts = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [42]]
    left, right = model(*pad_sequences(texts, left=True))[0], model(*pad_sequences(texts, left=False))[0]
    torch.testing.assert_close(left, right, rtol=1e-5, atol=1e-5)


def test_exporting_a_switched_model_to_hugging_face_is_refused(tmp_path):
    from gpt.hf import save_pretrained

    with pytest.raises(UserError, match="attention = 'linear'"):
        save_pretrained(model_with(attention="linear"), tmp_path / "hf")
    with pytest.raises(UserError, match="block = 'gau'"):
        save_pretrained(model_with(block="gau"), tmp_path / "hf")


# ---- prefix (UniLM / T5) and bidirectional (BERT) attention -------------------------------------


def test_the_prefix_mask_is_the_explicit_matrix():
    model = model_with()
    pos = torch.arange(6)[None]
    mask = model.attention_mask(pos, pos, torch.arange(6), torch.tensor([3]))[0, 0].int()
    expected = torch.tensor([[1, 1, 1, 0, 0, 0],  # positions 0-2: the prefix, seen both ways
                             [1, 1, 1, 0, 0, 0],
                             [1, 1, 1, 0, 0, 0],
                             [1, 1, 1, 1, 0, 0],  # then causal
                             [1, 1, 1, 1, 1, 0],
                             [1, 1, 1, 1, 1, 1]])
    assert torch.equal(mask, expected)


@pytest.mark.parametrize("arch", [{}, dict(position="rope"), dict(position="alibi"), dict(block="gau"),
                                  dict(attention="synthesizer_dense")], ids=["gpt2", "rope", "alibi", "gau", "synth"])
def test_bidirectional_attention_lets_a_later_token_change_an_earlier_output(arch):
    model = model_with(**arch)
    model.transformer.wte.weight.data *= 50  # inputs of unit size, so that every mechanism mixes visibly
    for block in model.transformer.h:  # and a GAU whose relu² weights are not ~1e-8 (as at initialisation)
        for name in ("c_z", "c_uv", "c_proj"):
            if hasattr(block.attn, name) and model.config.block == "gau":
                getattr(block.attn, name).weight.data *= 20
    idx = torch.randint(0, 61, (2, 10), generator=torch.Generator().manual_seed(2))
    changed = idx.clone()
    changed[:, -1] = (idx[:, -1] + 1) % 61
    with torch.no_grad():
        causal = model.hidden_states(idx), model.hidden_states(changed)
        both = model.hidden_states(idx, prefix=10), model.hidden_states(changed, prefix=10)
        half = model.hidden_states(idx, prefix=5), model.hidden_states(changed, prefix=5)
    torch.testing.assert_close(causal[0][:, :9], causal[1][:, :9])  # GPT: the past does not see the future
    assert (both[0][:, 0] - both[1][:, 0]).abs().max() > 1e-4  # BERT: it does
    torch.testing.assert_close(half[0][:, :9], half[1][:, :9])  # prefix LM: not beyond the prefix
    changed[:, 3] = (idx[:, 3] + 1) % 61  # a prefix token changes the prefix's first output
    with torch.no_grad():
        assert (model.hidden_states(changed, prefix=5)[:, 0] - half[0][:, 0]).abs().max() > 1e-4


@pytest.mark.parametrize("arch", [{}, dict(position="alibi", attention_window=3), dict(block="gau")],
                         ids=["gpt2", "alibi-window", "gau"])
def test_prefix_attention_with_left_padding_and_a_cache_equals_each_row_alone(arch):
    from gpt.model import pad_sequences

    model = model_with(**arch)
    rows = [[5, 6, 7, 8, 9, 10], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [42, 43]]
    prefix = torch.tensor([4, 6, 1])
    idx, mask = pad_sequences(rows)
    with torch.no_grad():
        batch = model.hidden_states(idx, attention_mask=mask, prefix=prefix)
        cache = model.new_kv_cache(3)
        prefilled = model.hidden_states(idx, attention_mask=mask, kv_cache=cache, prefix=prefix)
        step = model.hidden_states(torch.tensor([[7], [8], [9]]), kv_cache=cache)
        for i, row in enumerate(rows):
            alone = model.hidden_states(torch.tensor([row + [7 + i]]), prefix=int(prefix[i]))[0]
            torch.testing.assert_close(batch[i, idx.size(1) - len(row):], alone[:-1], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(prefilled[i, idx.size(1) - len(row):], alone[:-1], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(step[i, 0], alone[-1], rtol=1e-5, atol=1e-5)


def test_linear_attention_refuses_a_prefix():
    with pytest.raises(UserError, match="has no bidirectional or prefix attention"):
        model_with(attention="linear").hidden_states(torch.zeros(1, 4, dtype=torch.long), prefix=4)
