"""GPT-2 weights to and from the Hugging Face format, checked against transformers itself
on small randomly initialised models (no download)."""

import json

import pytest
import torch

from gpt import GPT, GPTConfig, UserError
from gpt.hf import from_pretrained, load_pretrained, save_pretrained
from gpt.tokenizer import from_spec, get_tokenizer, with_added

transformers = pytest.importorskip("transformers")

HF_SMALL = dict(n_layer=2, n_head=4, n_embd=64, n_positions=48, vocab_size=300)


def random_hf_model(seed=0, **overrides):
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**HF_SMALL, **overrides}))
    with torch.no_grad():  # biases and LayerNorms away from their 0/1 init, so they matter
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def random_ids(vocab_size, shape=(3, 21), seed=1):
    return torch.randint(0, vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def hf_logits(model, idx):
    with torch.no_grad():
        return model(idx).logits


def our_logits(model, idx):
    with torch.no_grad():
        return model(idx, torch.zeros_like(idx))[0]


@pytest.mark.parametrize("safe_serialization", [True, False], ids=["safetensors", "pytorch_model.bin"])
def test_hf_to_ours_gives_equal_logits(tmp_path, safe_serialization):
    hf = random_hf_model()
    hf.save_pretrained(tmp_path, safe_serialization=safe_serialization)
    ours = from_pretrained(str(tmp_path)).eval()
    assert ours.config.n_layer == 2 and ours.config.block_size == 48 and ours.config.vocab_size == 300
    idx = random_ids(300)
    torch.testing.assert_close(our_logits(ours, idx), hf_logits(hf, idx), rtol=1e-4, atol=1e-4)
    # the transposed Conv1D weights are stored in nn.Linear's own layout, not as transposed views
    assert all(p.is_contiguous() for p in ours.parameters())


@pytest.mark.parametrize("bias", [True, False])
def test_ours_to_hf_gives_equal_logits(tmp_path, bias):
    torch.manual_seed(0)
    ours = GPT(GPTConfig(block_size=40, vocab_size=250, n_layer=2, n_head=2, n_embd=48, bias=bias)).eval()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    save_pretrained(ours, tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    idx = random_ids(250, (2, 40))
    torch.testing.assert_close(hf_logits(hf, idx), our_logits(ours, idx), rtol=1e-4, atol=1e-4)
    # and back again
    again = from_pretrained(tmp_path).eval()
    torch.testing.assert_close(our_logits(again, idx), our_logits(ours, idx), rtol=1e-5, atol=1e-5)


def test_gpt2model_keys_without_transformer_prefix_load(tmp_path):
    # The hub's gpt2 model.safetensors stores GPT2Model keys ("h.0.attn...", no lm_head).
    hf = random_hf_model()
    hf.transformer.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "gpt2"
    ours = from_pretrained(tmp_path).eval()
    idx = random_ids(300)
    torch.testing.assert_close(our_logits(ours, idx), hf_logits(hf, idx), rtol=1e-4, atol=1e-4)


def test_dropout_and_padding_can_be_overridden_but_shapes_cannot(tmp_path):
    hf = random_hf_model()
    hf.save_pretrained(tmp_path)
    assert from_pretrained(tmp_path, dropout=0.1).config.dropout == 0.1
    unpadded = from_pretrained(tmp_path, vocab_multiple=1).eval()
    assert unpadded.transformer.wte.weight.shape[0] == 300
    assert unpadded.lm_head.weight is unpadded.transformer.wte.weight  # still tied after loading
    idx = random_ids(300)
    torch.testing.assert_close(our_logits(unpadded, idx), hf_logits(hf, idx), rtol=1e-4, atol=1e-4)
    with pytest.raises(UserError, match="cannot override n_layer"):
        from_pretrained(tmp_path, n_layer=4)


def test_our_tokenizer_is_recorded_beside_the_weights(tmp_path):
    """save_pretrained(model, dir, tokenizer) writes gpt_tokenizer.json, which load_pretrained returns
    (from_spec rebuilds the tokenizer); transformers still loads the directory; an export without a
    tokenizer removes it; a tokenizer of another vocabulary is refused."""
    tok = get_tokenizer("char", text="ROMEO: But soft, what light\n")
    torch.manual_seed(0)
    ours = GPT(GPTConfig(block_size=16, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=16)).eval()
    save_pretrained(ours, tmp_path, tok)
    model, spec = load_pretrained(tmp_path)
    assert spec == tok.spec() and from_spec(spec).decode(tok.encode("ROMEO: what")) == "ROMEO: what"
    idx = torch.tensor([tok.encode("ROMEO: But")])
    torch.testing.assert_close(our_logits(model.eval(), idx), our_logits(ours, idx))
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(hf_logits(hf, idx), our_logits(ours, idx), rtol=1e-4, atol=1e-4)
    save_pretrained(ours, tmp_path)  # no tokenizer: the earlier spec goes with the weights it described
    assert not (tmp_path / "gpt_tokenizer.json").exists() and load_pretrained(tmp_path)[1] is None
    with pytest.raises(UserError, match="the tokenizer has 50,257 token ids but the model 21"):
        save_pretrained(ours, tmp_path, get_tokenizer("gpt2"))


def test_a_masked_lm_is_not_exported_as_a_left_to_right_gpt2(tmp_path):
    masked = with_added(get_tokenizer("char", text="ROMEO: But soft\n"), ["mask"])
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=masked.vocab_size, n_layer=1, n_head=2, n_embd=16))
    for how in ({"tokenizer": masked}, {"objective": "mlm"}):
        with pytest.raises(UserError, match="a masked LM reads every token both ways"):
            save_pretrained(model, tmp_path / "hf", **how)
    assert not (tmp_path / "hf").exists()
    save_pretrained(model, tmp_path / "hf", objective="prefix")  # read left to right, a prefix LM is a causal LM


# ---- bad input -----------------------------------------------------------------------


def test_unknown_hub_id_is_a_clear_error():
    with pytest.raises(UserError, match="unknown model 'gpt-17'.*gpt2, gpt2-medium, gpt2-large, gpt2-xl"):
        from_pretrained("gpt-17")


def test_directory_without_weights(tmp_path):
    random_hf_model().config.save_pretrained(tmp_path)  # config.json only
    with pytest.raises(UserError, match="has no model.safetensors or pytorch_model.bin"):
        from_pretrained(tmp_path)


def test_directory_without_config(tmp_path):
    with pytest.raises(UserError, match="has no config.json"):
        from_pretrained(tmp_path)


def test_config_json_that_is_not_an_object(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="holds a JSON list, not a model configuration"):
        from_pretrained(tmp_path)


def test_a_file_instead_of_a_directory(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0")
    with pytest.raises(UserError, match="is a file"):
        from_pretrained(tmp_path / "weights.bin")


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(model_type="llama"), "model_type is 'llama', not 'gpt2'"),
        (dict(activation_function="relu"), "activation_function 'relu'"),
        (dict(n_inner=100), "n_inner 100"),
        (dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
        (dict(tie_word_embeddings=False), "tie_word_embeddings false"),
    ],
)
def test_config_that_is_not_gpt2_shaped(tmp_path, change, message):
    random_hf_model().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(UserError, match=message):
        from_pretrained(tmp_path)


def test_weights_that_do_not_fit_the_config(tmp_path):
    random_hf_model().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "n_embd": 128}))
    with pytest.raises(UserError, match="do not fit its config.json"):
        from_pretrained(tmp_path)
