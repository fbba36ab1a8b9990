"""GPT-2 weights in from, and out to, the Hugging Face format.

    from gpt.hf import from_pretrained, save_pretrained
    model = from_pretrained("gpt2")              # hub id: needs the network
    model = from_pretrained("path/to/dir")       # config.json + model.safetensors or pytorch_model.bin
    save_pretrained(model, "out/hf")             # transformers.GPT2LMHeadModel.from_pretrained loads it
    save_pretrained(model, "out/hf", tokenizer)  # ... and records our tokenizer's spec beside the weights
    model, spec = load_pretrained("out/hf")      # the model and that spec (None: none recorded)

These are functions here, not methods of GPT, so that gpt/model.py stays the
network alone (it imports nothing of this module; this module builds on it).

Our parameter names are GPT-2's, so the conversion is small: Hugging Face keeps
the four projection matrices as Conv1D, stored (in, out), which we transpose to
nn.Linear's (out, in) and back; the tied LM head is stored once; the causal-mask
buffers of old checkpoints are dropped; our vocabulary padding rows are added on
load and removed on save. Only downloading needs an extra package
(huggingface_hub, which comes with `pip install "gpt[hf]"`); writing
model.safetensors needs safetensors, else pytorch_model.bin is written.

A Hugging Face directory does not say which tokenizer its ids belong to (GPT-2's,
for every GPT-2). save_pretrained(model, dir, tokenizer) records the spec of a
model's tokenizer (char, byte, ...) in gpt_tokenizer.json, and load_pretrained
returns it beside the model: gpt.tokenizer.from_spec rebuilds the tokenizer
(without a spec it is GPT-2's; gpt.checkpoint.load_language_model, which the
commands use, does this and refuses a model whose vocabulary is not the tokenizer's).
This module only stores the spec: it knows no tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from gpt.atomic import atomic_path
from gpt.errors import UserError
from gpt.model import GPT, GPTConfig
from gpt.objectives import MASK

HUB_MODELS = {  # short name -> hub repository
    "gpt2": "openai-community/gpt2",  # 124M
    "gpt2-medium": "openai-community/gpt2-medium",  # 350M
    "gpt2-large": "openai-community/gpt2-large",  # 774M
    "gpt2-xl": "openai-community/gpt2-xl",  # 1558M
}
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
CONFIG_OVERRIDES = ("dropout", "vocab_multiple")  # fields that do not change the weights
TOKENIZER_FILE = "gpt_tokenizer.json"  # our tokenizer's spec, beside the weights of a model of ours


# ---- loading ----------------------------------------------------------------------


def from_pretrained(name_or_dir: str | Path, **overrides) -> GPT:
    """GPT-2 weights from a hub id (gpt2, gpt2-medium, gpt2-large, gpt2-xl, owner/name; needs
    the network) or a local directory (config.json + model.safetensors / pytorch_model.bin).
    overrides: GPTConfig fields that do not change the weights' shapes (dropout, vocab_multiple)."""
    directory = resolve(name_or_dir)
    config = config_from_hf(read_hf_config(directory), str(directory), **overrides)
    with torch.device("meta"):  # shapes only: no time spent initialising weights we replace
        model = GPT(config)
    state = {k: v.float() for k, v in state_dict_from_hf(read_weights(directory), config).items()}
    try:
        model.load_state_dict(state, assign=True)
    except RuntimeError as e:
        detail = str(e).strip().splitlines()[-1].strip()
        raise UserError(f"the weights in {directory} do not fit its config.json: {detail}") from None
    model.lm_head.weight = model.transformer.wte.weight  # assign=True gave each its own Parameter
    return model


def load_pretrained(name_or_dir: str | Path, **overrides) -> tuple[GPT, dict | None]:
    """from_pretrained's model, and the spec of its tokenizer that save_pretrained recorded beside
    it (gpt_tokenizer.json), or None where none is (then the tokenizer is GPT-2's)."""
    directory = resolve(name_or_dir)
    return from_pretrained(directory, **overrides), read_tokenizer_spec(directory)


def read_tokenizer_spec(directory: Path) -> dict | None:
    """The tokenizer spec in directory/gpt_tokenizer.json, or None without that file."""
    path = directory / TOKENIZER_FILE
    if not path.exists():
        return None
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e.msg}, line {e.lineno}): export the model again") from None
    if not isinstance(spec, dict):
        raise UserError(f"{path} holds a JSON {type(spec).__name__}, not a tokenizer spec: export the model again")
    return spec


def resolve(name_or_dir: str | Path) -> Path:
    """A local directory as is; a hub id downloaded (config + weights) to the HF cache."""
    path = Path(name_or_dir)
    if path.is_dir():
        return path
    name = str(name_or_dir)
    if path.exists():
        raise UserError(f"{name} is a file: pass the directory that holds config.json and the weights")
    if name not in HUB_MODELS and name.count("/") != 1:
        raise UserError(
            f"unknown model {name!r}: not a local directory, nor one of "
            f"{', '.join(HUB_MODELS)} or an 'owner/name' hub id"
        )
    return download(HUB_MODELS.get(name, name), local_hint=name not in HUB_MODELS)


def download(repo: str, local_hint: bool = False) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UserError(f"downloading {repo!r} needs huggingface_hub: pip install 'gpt[hf]'") from None
    try:
        path = Path(snapshot_download(repo, allow_patterns=["config.json", TOKENIZER_FILE, "model.safetensors"]))
        if not (path / "model.safetensors").exists():
            path = Path(snapshot_download(repo, allow_patterns=["config.json", TOKENIZER_FILE, "pytorch_model.bin"]))
    except Exception as e:  # offline, unknown repo, gated repo, ...: all user-fixable
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        also = f"; there is no local directory {repo} either" if local_hint else ""
        raise UserError(
            f"could not download {repo!r} from the Hugging Face hub ({reason}){also}: "
            f"check the name and the network, or pass a local directory"
        ) from None
    return path


def read_hf_config(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.exists():
        raise UserError(f"{directory} has no config.json: point to a directory written by save_pretrained")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} holds a JSON {type(config).__name__}, not a model configuration object")
    return config


def config_from_hf(hf: dict, source: str, **overrides) -> GPTConfig:
    """Our GPTConfig from a transformers GPT2Config dict; anything not GPT-2-shaped is refused."""
    model_type = hf.get("model_type")
    if model_type != "gpt2":
        raise UserError(f"{source}: model_type is {model_type!r}, not 'gpt2': only GPT-2 models can be loaded")
    n_embd = hf.get("n_embd", 768)
    problems = []
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        problems.append(f"activation_function {hf['activation_function']!r} (expected gelu_new)")
    if hf.get("n_inner") not in (None, 4 * n_embd):
        problems.append(f"n_inner {hf['n_inner']} (expected 4 * n_embd = {4 * n_embd})")
    if not hf.get("scale_attn_weights", True):
        problems.append("scale_attn_weights false")
    if hf.get("scale_attn_by_inverse_layer_idx", False):
        problems.append("scale_attn_by_inverse_layer_idx true")
    if hf.get("add_cross_attention", False):
        problems.append("add_cross_attention true")
    if not hf.get("tie_word_embeddings", True):
        problems.append("tie_word_embeddings false")
    if problems:
        raise UserError(f"{source} is not GPT-2-shaped: {'; '.join(problems)}")
    unknown = sorted(set(overrides) - set(CONFIG_OVERRIDES))
    if unknown:
        raise UserError(f"cannot override {', '.join(unknown)} of a pretrained model; allowed: {', '.join(CONFIG_OVERRIDES)}")
    return GPTConfig(
        block_size=hf.get("n_positions", 1024),
        vocab_size=hf.get("vocab_size", 50257),
        n_layer=hf.get("n_layer", 12),
        n_head=hf.get("n_head", 12),
        n_embd=n_embd,
        layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        bias=True,
        **{"dropout": 0.0, **overrides},
    )


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    safetensors_file, torch_file = directory / "model.safetensors", directory / "pytorch_model.bin"
    if safetensors_file.exists():
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise UserError(f"reading {safetensors_file} needs safetensors: pip install 'gpt[hf]'") from None
        return load_file(safetensors_file)
    if torch_file.exists():
        return torch.load(torch_file, map_location="cpu", weights_only=True)
    raise UserError(
        f"{directory} has no model.safetensors or pytorch_model.bin "
        f"(sharded checkpoints are not supported): point to a directory with the weights"
    )


def state_dict_from_hf(hf_state: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """Hugging Face GPT2LMHeadModel / GPT2Model tensors -> our state_dict."""
    state = {}
    for key, t in hf_state.items():
        key = key.removeprefix("transformer.")
        if key.endswith((".attn.bias", ".attn.masked_bias")) or key == "lm_head.weight":
            continue  # causal-mask buffers of old checkpoints; the LM head is tied to wte
        # Conv1D stores (in, out): transpose into nn.Linear's (out, in) layout, contiguous (load_model
        # assigns these tensors, and a transposed view would make every product read memory across)
        state["transformer." + key] = t.t().contiguous() if key.endswith(CONV1D_WEIGHTS) else t
    wte = state.get("transformer.wte.weight")
    if wte is not None and wte.size(0) == config.vocab_size:  # add our vocabulary padding rows
        pad = wte.new_zeros(config.padded_vocab_size - config.vocab_size, wte.size(1))
        state["transformer.wte.weight"] = wte = torch.cat([wte, pad])
    state["lm_head.weight"] = wte
    return state


# ---- saving -----------------------------------------------------------------------


def not_gpt2(config: GPTConfig) -> list[str]:
    """The architecture switches set away from GPT-2's, as 'field = value' (empty for a GPT-2)."""
    gpt2 = GPTConfig()
    fields = ("position", "norm", "norm_position", "attention_window", "attention_pattern", "attention_stride",
              "attention", "attention_scale", "block")
    changed = [f"{f} = {getattr(config, f)!r}" for f in fields if getattr(config, f) != getattr(gpt2, f)]
    if config.kv_heads != config.n_head:
        changed.append(f"n_kv_head = {config.n_kv_head}")
    return changed


def save_pretrained(model: GPT, directory: str | Path, tokenizer=None, objective: str | None = None) -> None:
    """Write a directory that transformers.GPT2LMHeadModel.from_pretrained loads with equal logits.
    tokenizer: the model's gpt.tokenizer.Tokenizer, whose spec() is written (last) to
    gpt_tokenizer.json for load_pretrained; without it, readers take GPT-2's tokenizer. A
    gpt_tokenizer.json of an earlier export there is removed first: it described other weights.
    objective: what the model was trained to predict (its checkpoint's "objective"). A masked LM
    is refused (when the objective is not given, a tokenizer with the mask token says so):
    GPT2LMHeadModel reads left to right, so transformers, and a reload of the export, would run
    it as a model it is not."""
    changed = not_gpt2(model.config)
    if changed:
        raise UserError(f"only a GPT-2 architecture can be exported to Hugging Face GPT2LMHeadModel; this model has "
                        f"{', '.join(changed)}")
    masked_tokenizer = tokenizer is not None and MASK in tokenizer.spec().get("added", ())
    if objective == "mlm" or (objective is None and masked_tokenizer):
        raise UserError("a masked LM reads every token both ways, but GPT2LMHeadModel reads left to right: it cannot "
                        "be exported as a GPT-2 (fine-tune it here, or score it with python -m gpt.evaluate)")
    if tokenizer is not None and tokenizer.vocab_size != model.config.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size:,} token ids but the model {model.config.vocab_size:,}: "
                        f"pass the tokenizer the model was trained with")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / TOKENIZER_FILE).unlink(missing_ok=True)
    tensors = state_dict_to_hf(model)
    try:
        from safetensors.torch import save_file
    except ImportError:  # transformers reads either
        with atomic_path(directory / "pytorch_model.bin") as tmp:
            torch.save(tensors, tmp)
    else:
        with atomic_path(directory / "model.safetensors") as tmp:
            save_file(tensors, tmp, metadata={"format": "pt"})
    with atomic_path(directory / "config.json") as tmp:
        tmp.write_text(json.dumps(config_to_hf(model), indent=2) + "\n")
    if tokenizer is not None:
        with atomic_path(directory / TOKENIZER_FILE) as tmp:
            tmp.write_text(json.dumps(tokenizer.spec(), ensure_ascii=False) + "\n", encoding="utf-8")


def state_dict_to_hf(model: GPT) -> dict[str, torch.Tensor]:
    """Our weights as GPT2LMHeadModel's: Conv1D layout, no padding rows, explicit zero biases."""
    config = model.config
    tensors = {}
    for key, t in model.state_dict().items():
        if key == "lm_head.weight":
            continue  # tied to transformer.wte.weight; transformers re-ties it on load
        if key == "transformer.wte.weight":
            t = t[: config.vocab_size]
        tensors[key] = (t.t() if key.endswith(CONV1D_WEIGHTS) else t).detach().cpu().contiguous().clone()
    # GPT-2 always has biases: a bias=False model is the same function with zero biases.
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.LayerNorm)) and module.bias is None and name != "lm_head":
            w = module.weight
            tensors[f"{name}.bias"] = torch.zeros(w.size(0), dtype=w.dtype)
    return tensors


def config_to_hf(model: GPT) -> dict:
    c = model.config
    eos = 50256 if c.vocab_size == 50257 else None  # GPT-2's <|endoftext|>; unknown otherwise
    return {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": c.vocab_size,
        "n_positions": c.block_size,
        "n_embd": c.n_embd,
        "n_layer": c.n_layer,
        "n_head": c.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": c.layer_norm_eps,
        "resid_pdrop": c.dropout,
        "embd_pdrop": c.dropout,
        "attn_pdrop": c.dropout,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "tie_word_embeddings": True,
        "bos_token_id": eos,
        "eos_token_id": eos,
        "torch_dtype": str(model.transformer.wte.weight.dtype).removeprefix("torch."),
    }
