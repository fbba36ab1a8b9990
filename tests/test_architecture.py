"""The architecture switches (position, norm, norm_position, attention_window, n_kv_head),
each against a direct reference: formulas written out here, an independent forward pass,
multi-head attention with repeated keys/values; and reading past block_size.
(tests/test_model.py runs its KV-cache and padding tests on every switch too.)"""

import cmath
import math

import pytest
import torch

from gpt import GPT, GPTConfig, UserError
from gpt.positions import alibi_slopes, apply_rope, rope_angles, sinusoidal
from gpt.sampling import generate

SHAPE = dict(block_size=16, vocab_size=61, n_layer=2, n_head=4, n_embd=32)


def model_with(seed=0, **arch) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**SHAPE, **arch}))
    with torch.no_grad():  # non-trivial norms and biases, so the reference must get them right
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


# ---- the formulas ---------------------------------------------------------------------


def test_sinusoidal_table_is_the_papers_formula():
    pos, dim = torch.arange(50), 10
    table = sinusoidal(pos, dim)
    for p in (0, 1, 7, 49):
        for i in range(dim // 2):
            angle = p / 10000 ** (2 * i / dim)
            assert table[p, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert table[p, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


def test_rope_is_a_complex_rotation_and_scores_depend_only_on_distance():
    D, base = 8, 10000.0
    x = torch.randn(2, 3, 5, D, dtype=torch.float64)
    pos = torch.tensor([0, 1, 4, 9, 30])
    rotated = apply_rope(x, *rope_angles(pos, D, base))
    for b, h, t in [(0, 0, 0), (1, 2, 3), (0, 1, 4)]:
        for i in range(D // 2):
            z = complex(x[b, h, t, i], x[b, h, t, i + D // 2]) * cmath.exp(1j * pos[t].item() * base ** (-2 * i / D))
            assert rotated[b, h, t, i].item() == pytest.approx(z.real, abs=1e-5)
            assert rotated[b, h, t, i + D // 2].item() == pytest.approx(z.imag, abs=1e-5)
    q, k = torch.randn(D), torch.randn(D)

    def score(pq, pk):
        rq = apply_rope(q[None, None, None], *rope_angles(torch.tensor([pq]), D, base))
        rk = apply_rope(k[None, None, None], *rope_angles(torch.tensor([pk]), D, base))
        return (rq * rk).sum().item()

    assert score(7, 3) == pytest.approx(score(104, 100), abs=1e-4)
    assert score(7, 3) != pytest.approx(score(7, 5), abs=1e-3)


def test_alibi_slopes_are_the_papers():
    # "For a model with 8 heads, our slopes are 1/2, 1/4, ..., 1/256"; 16 heads interleave them
    assert alibi_slopes(8).tolist() == [2.0 ** -(i + 1) for i in range(8)]
    assert alibi_slopes(16).tolist() == pytest.approx([2.0 ** -(0.5 * (i + 1)) for i in range(16)])
    # 12 heads, not a power of two: the 8-head slopes, then every other 16-head slope
    assert alibi_slopes(12).tolist() == pytest.approx([2.0 ** -(i + 1) for i in range(8)] + [2 ** -0.5, 2 ** -1.5, 2 ** -2.5, 2 ** -3.5])
    assert alibi_slopes(6).tolist() == pytest.approx([2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3])


def test_rmsnorm_is_the_root_mean_square_formula():
    model = model_with(norm="rmsnorm")
    ln = model.transformer.h[0].ln_1
    x = torch.randn(3, 32)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * ln.weight
    torch.testing.assert_close(ln(x), expected, rtol=1e-5, atol=1e-6)


# ---- an independent forward pass ---------------------------------------------------------


def reference_logits(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """The model's function written out from the definitions, one sequence of T tokens from
    position 0: explicit (T, T) masks, the ALiBi bias as -slope x distance, RoPE as a complex
    rotation, grouped keys/values by index, the 2017 post-norm ordering."""
    c = model.config
    T, C, H, D = idx.size(1), c.n_embd, c.n_head, c.head_dim
    Hkv = c.n_kv_head or H
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    visible = (j <= i) & ((i - j < c.attention_window) if c.attention_window else True)
    x = model.transformer.wte(idx)
    if c.position == "learned":
        x = x + model.transformer.wpe.weight[:T]
    if c.position == "sinusoidal":
        table = torch.tensor([[math.sin(p / 10000 ** (k / C)) if k % 2 == 0 else math.cos(p / 10000 ** ((k - 1) / C))
                               for k in range(C)] for p in range(T)])
        x = x * math.sqrt(C) + table

    def rotate(t):  # (1, heads, T, D): pairs (d, d + D/2) as complex numbers, turned by p * theta_d
        z = torch.complex(t[..., : D // 2].double(), t[..., D // 2 :].double())
        theta = c.rope_base ** (-2 * torch.arange(D // 2, dtype=torch.float64) / D)
        z = z * torch.polar(torch.ones(T, D // 2, dtype=torch.float64), torch.arange(T)[:, None] * theta)
        return torch.cat([z.real, z.imag], -1).float()

    for block in model.transformer.h:
        a = x if c.norm_position == "post" else block.ln_1(x)
        q, k, v = block.attn.c_attn(a).split([C, Hkv * D, Hkv * D], -1)
        q, k, v = q.view(1, T, H, D).transpose(1, 2), k.view(1, T, Hkv, D).transpose(1, 2), v.view(1, T, Hkv, D).transpose(1, 2)
        if c.position == "rope":
            q, k = rotate(q), rotate(k)
        group = [h * Hkv // H for h in range(H)]  # the key/value head of each query head
        scores = q @ k[:, group].transpose(-2, -1) / math.sqrt(D)
        if c.position == "alibi":
            n0 = 2 ** math.floor(math.log2(H))
            slopes = [2 ** (-8 * (h + 1) / n0) for h in range(n0)] + [2 ** (-8 * (h + 1) / (2 * n0)) for h in range(0, 2 * (H - n0), 2)]
            scores = scores - torch.tensor(slopes)[:, None, None] * (i - j)
        y = scores.masked_fill(~visible, float("-inf")).softmax(-1) @ v[:, group]
        y = block.attn.c_proj(y.transpose(1, 2).reshape(1, T, C))
        x = block.ln_1(x + y) if c.norm_position == "post" else x + y
        m = block.mlp(x if c.norm_position == "post" else block.ln_2(x))
        x = block.ln_2(x + m) if c.norm_position == "post" else x + m
    if c.norm_position == "pre":
        x = model.transformer.ln_f(x)
    return model.logits(x)


@pytest.mark.parametrize("arch", [
    {},
    dict(position="sinusoidal"),
    dict(position="rope", rope_base=500.0),
    dict(position="alibi"),
    dict(position="alibi", n_head=8, n_embd=48),  # 8 heads: a power of two
    dict(position="alibi", n_head=6, n_embd=48),  # 6 heads: the non-power-of-two rule
    dict(position="none"),
    dict(norm="rmsnorm"),
    dict(norm_position="post"),
    dict(attention_window=3),
    dict(n_kv_head=2),
    dict(n_kv_head=1, position="rope", attention_window=5, norm="rmsnorm", norm_position="post"),
], ids=lambda a: "-".join(f"{k}={v}" for k, v in a.items()) or "gpt2")
def test_model_equals_the_reference_forward(arch):
    model = model_with(**arch)
    idx = torch.randint(0, 61, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model.logits(model.hidden_states(idx)), reference_logits(model, idx), rtol=1e-4, atol=1e-4)
        probs = model.attention_probabilities(idx)  # the inspection path, for every option
    assert probs.shape == (2, 1, model.config.n_head, 12, 12)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 1, model.config.n_head, 12))
    if model.config.attention_window:
        assert probs[:, :, :, 11, : 12 - model.config.attention_window].abs().max() == 0


def test_grouped_query_attention_equals_multi_head_with_repeated_keys_and_values():
    gqa = model_with(n_kv_head=2)  # 4 query heads, 2 key/value heads: heads 0,1 share kv 0; 2,3 share kv 1
    mha = GPT(GPTConfig(**SHAPE)).eval()
    state = gqa.state_dict()
    D, C = 8, 32
    for layer in range(2):
        for part in ("weight", "bias"):
            key = f"transformer.h.{layer}.attn.c_attn.{part}"
            q, k, v = state[key].split([C, 2 * D, 2 * D])
            repeat = lambda t: t.view(2, D, *t.shape[1:]).repeat_interleave(2, 0).reshape(C, *t.shape[1:])
            state[key] = torch.cat([q, repeat(k), repeat(v)])
    mha.load_state_dict(state)
    idx = torch.randint(0, 61, (3, 14))
    with torch.no_grad():
        torch.testing.assert_close(gqa.hidden_states(idx), mha.hidden_states(idx), rtol=1e-5, atol=1e-5)
    cache = gqa.new_kv_cache(3)
    assert cache.k.shape == (2, 3, 2, 16, 8)  # the cache holds the 2 key/value heads only


def test_windowed_attention_equals_full_attention_with_a_band_mask():
    windowed = model_with(attention_window=4)
    full = model_with()  # same seed: the same weights
    idx = torch.randint(0, 61, (2, 13))
    band = torch.ones(13, 13, dtype=torch.bool).tril() & ~torch.ones(13, 13, dtype=torch.bool).tril(-4)

    def banded(self, q, k, v, attn_mask):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=band)

    with torch.no_grad():
        expected = windowed.hidden_states(idx)
        for block in full.transformer.h:
            block.attn.attend = banded.__get__(block.attn)
        torch.testing.assert_close(full.hidden_states(idx), expected, rtol=1e-5, atol=1e-5)


# ---- past block_size -------------------------------------------------------------------


@pytest.mark.parametrize("position", ["sinusoidal", "rope", "alibi", "none"])
def test_positions_that_extrapolate_read_and_generate_past_block_size(position):
    model = model_with(position=position, attention_window=0 if position != "none" else 6)
    assert model.max_context() is None
    long = torch.randint(0, 61, (2, 40))  # block_size is 16
    with torch.no_grad():
        h = model.hidden_states(long)
        assert torch.isfinite(h).all()
        torch.testing.assert_close(model.hidden_states(long[:, :16]), h[:, :16], rtol=1e-5, atol=1e-5)  # causal
    prompt = long[:, :10]
    out = generate(model, prompt, 30, temperature=0)
    assert out.shape == (2, 40)
    seq = prompt
    with torch.no_grad():
        for _ in range(30):  # no cache, no sliding: the whole sequence each time
            seq = torch.cat([seq, model.logits(model.hidden_states(seq))[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)


def test_learned_positions_stop_at_block_size():
    model = model_with()
    assert model.max_context() == 16
    with pytest.raises(UserError, match="longer than the model's block_size"):
        model.hidden_states(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(UserError, match="learned position embeddings, block_size = 16"):
        model.new_kv_cache(1, length=40)


def test_init_from_a_rope_run_with_a_longer_block_size_trains_and_saves_it(char_data, tmp_path):
    """RoPE has no position weights (nothing in the model is sized by block_size), so a run of
    block_size 16 can start one of block_size 48: it trains from the loaded weights, and its
    checkpoint has the new block_size and loads. (Learned positions are refused: test_bad_inputs.)"""
    import train
    from gpt.checkpoint import load_checkpoint, load_model
    from test_train import args, step_losses

    train.main(args(char_data, tmp_path / "short", "--model.position=rope", "--model.block_size=16", "--max_iters=12"))
    train.main(args(char_data, tmp_path / "long", "--model.position=rope", "--model.block_size=48", "--max_iters=4",
                    f"--run.init_from={tmp_path / 'short'}"))
    short, long = step_losses(tmp_path / "short"), step_losses(tmp_path / "long")
    assert all(math.isfinite(v) for v in long.values()) and long[1] < short[1] - 0.3  # it starts trained
    saved = load_checkpoint(tmp_path / "long" / "ckpt.pt")
    assert saved["model_config"]["block_size"] == 48 and saved["model_config"]["position"] == "rope"
    model, _, _ = load_model(tmp_path / "long" / "ckpt.pt")
    assert model.config.block_size == 48
    assert torch.isfinite(model(torch.zeros(2, 48, dtype=torch.long), torch.zeros(2, 48, dtype=torch.long))[1])


# ---- bad settings ----------------------------------------------------------------------


@pytest.mark.parametrize("overrides, message", [
    (dict(position="relative"), "position must be one of 'learned', 'sinusoidal', 'rope', 'alibi', 'none'"),
    (dict(norm="batchnorm"), "norm must be one of 'layernorm', 'rmsnorm'"),
    (dict(norm_position="middle"), "norm_position must be one of 'pre', 'post'"),
    (dict(attention_window=-1), "attention_window must be a whole number >= 0"),
    (dict(n_kv_head=3), "n_kv_head (3) must divide n_head (4)"),
    (dict(position="rope", n_head=2, n_embd=30), "head dimension n_embd / n_head = 15 is odd"),
    (dict(position="rope", rope_base=0.0), "rope_base must be greater than 1, got 0.0"),
    (dict(position="rope", rope_base=1e-300), "rope_base must be greater than 1, got 1e-300"),
    (dict(position="rope", rope_base=1.0), "frequencies do not fall from one dimension pair to the next"),
    (dict(attention_scale="logn", block_size=1), "attention_scale = 'logn' scales by log(n) / log(block_size): it "
                                                 "needs block_size >= 2"),
    (dict(attention="linear", position="alibi"), "use position = 'learned', 'sinusoidal' or 'none'"),
    (dict(attention="synthesizer_random", position="rope"), "position = 'rope' rotates queries and keys"),
])
def test_bad_architecture_settings_are_clear_errors(overrides, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        GPTConfig(**{**SHAPE, **overrides})


def test_a_checkpoint_from_before_the_switches_loads_as_gpt2():
    from dataclasses import asdict

    from gpt.checkpoint import gpt_from_checkpoint

    model = model_with()
    old = {k: v for k, v in asdict(model.config).items()
           if k not in ("position", "rope_base", "norm", "norm_position", "attention_window", "n_kv_head",
                        "attention_pattern", "attention_stride", "attention", "attention_scale", "block")}
    loaded = gpt_from_checkpoint({"model_config": old}).eval()
    loaded.load_state_dict(model.state_dict())  # strict: the same parameters, no more
    assert loaded.config == model.config
    idx = torch.randint(0, 61, (2, 9))
    torch.testing.assert_close(loaded.hidden_states(idx), model.hidden_states(idx), rtol=0, atol=0)


def test_exporting_a_non_gpt2_architecture_to_hugging_face_is_refused(tmp_path):
    from gpt.hf import save_pretrained

    with pytest.raises(UserError, match="position = 'rope', n_kv_head = 2"):
        save_pretrained(model_with(position="rope", n_kv_head=2), tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


# ---- everything else works with the switches ---------------------------------------------

COMBINATIONS = [
    ["--model.position=rope", "--model.norm=rmsnorm", "--model.n_kv_head=1", "--model.attention_window=8"],
    ["--model.position=alibi", "--model.norm_position=post", "--model.n_head=4"],
    ["--model.attention=linear", "--model.position=none"],
    ["--model.attention=synthesizer_random+softmax", "--model.attention_scale=logn"],
    ["--model.block=gau", "--model.position=rope", "--model.attention_pattern=strided", "--model.attention_stride=4"],
]
COMBINATION_IDS = ["rope-rms-mqa-window", "alibi-post", "linear", "synth-mix-logn", "gau-rope-strided"]


@pytest.mark.parametrize("arch", COMBINATIONS, ids=COMBINATION_IDS)
def test_classifier_pooling_is_the_same_with_left_or_right_padding(arch):
    from gpt.model import GPTClassifier, pad_sequences

    settings = {a.split("=")[0].removeprefix("--model."): a.split("=")[1] for a in arch}
    settings = {k: int(v) if v.isdigit() else v for k, v in settings.items()}
    torch.manual_seed(0)
    model = GPTClassifier(model_with(**settings), 3).eval()
    texts = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [42]]
    left, right = model(*pad_sequences(texts, left=True))[0], model(*pad_sequences(texts, left=False))[0]
    torch.testing.assert_close(left, right, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("arch", COMBINATIONS, ids=COMBINATION_IDS)
def test_a_run_learns_resumes_exactly_and_reads_past_its_block_size(arch, char_data, tmp_path, capsys):
    """(A Synthesizer reads at most its block_size: evaluated there, and generation slides.)"""
    import json

    import sample
    import train
    from gpt import evaluate
    from gpt.checkpoint import load_checkpoint
    from test_train import args, step_losses, weights

    more = [*arch, "--model.dropout=0.1"]
    train.main(args(char_data, tmp_path / "whole", "--max_iters=12", *more))
    train.main(args(char_data, tmp_path / "parts", "--max_iters=5", *more))
    train.main(args(char_data, tmp_path / "parts", "--max_iters=12", "--resume", *more))
    whole, parts = step_losses(tmp_path / "whole"), step_losses(tmp_path / "parts")
    assert whole == parts and whole[12] < whole[1] - 0.5  # bit-exact resume; the loss falls
    for name, tensor in weights(tmp_path / "whole").items():
        assert torch.equal(tensor, weights(tmp_path / "parts")[name]), name
    saved = load_checkpoint(tmp_path / "whole" / "ckpt.pt")["model_config"]
    assert all(str(saved[a.split("=")[0].removeprefix("--model.")]) == a.split("=")[1] for a in arch)

    results = tmp_path / "eval.json"
    contexts = {16, 32} if "synthesizer" in arch[0] else {32, 96}  # block_size is 32
    evaluate.main([f"--out_dir={tmp_path / 'whole'}", f"--context={','.join(map(str, sorted(contexts)))}",
                   f"--json={results}"])
    losses = {r["context"]: r["loss"] for r in json.loads(results.read_text())}
    assert set(losses) == contexts and all(math.isfinite(v) for v in losses.values())
    capsys.readouterr()
    decoding = ["--penalty_alpha=0.6", "--top_k=3"] if "synthesizer" in arch[0] else ["--temperature=0"]
    sample.main([f"--out_dir={tmp_path / 'whole'}", "--prompt=ROMEO:", "--max_new_tokens=80", *decoding,
                 "--no-stream"])
    assert len(capsys.readouterr().out) >= len("ROMEO:") + 80  # one character per token, past block_size


@pytest.mark.parametrize("arch", [dict(position="rope", n_kv_head=2, attention_window=6), dict(position="alibi", norm_position="post"),
                                  dict(attention="linear", position="none"), dict(attention="synthesizer_dense"),
                                  dict(block="gau", position="rope", attention_scale="sqrt_d")],
                         ids=["rope-gqa-window", "alibi-post", "linear", "synth-dense", "gau-rope"])
@pytest.mark.parametrize("settings", [dict(temperature=0), dict(penalty_alpha=0.6, top_k=4), dict(num_beams=3)],
                         ids=["greedy", "contrastive", "beam"])
def test_generation_of_a_left_padded_batch_equals_one_by_one(arch, settings):
    from gpt.model import pad_sequences

    model = model_with(**arch)
    prompts = [[5], [17, 3, 9, 42], list(range(20, 33))]
    idx, mask = pad_sequences(prompts)
    batch = generate(model, idx, 10, attention_mask=mask, **settings)  # 13 + 10 tokens: past block_size 16
    for i, prompt in enumerate(prompts):
        alone = generate(model, torch.tensor([prompt]), 10, **settings)[0].tolist()
        assert batch[i, idx.size(1) - len(prompt):].tolist() == alone
