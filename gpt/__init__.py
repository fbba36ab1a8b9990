"""gpt: pretrain, fine-tune and sample decoder-only GPT models in plain PyTorch.

    from gpt import GPT, GPTConfig
    model = GPT(GPTConfig(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=65))
    logits, loss = model(idx, targets)

See README.md for the command-line tools (train.py, sample.py, python -m gpt.prepare).
GPT and GPTConfig are imported on first use, so modules that need no torch
(the tokenizer, data preparation and its worker processes) start quickly.
"""

from gpt.errors import UserError

__all__ = ["GPT", "GPTConfig", "UserError"]
__version__ = "0.1.0"


def __getattr__(name):
    if name in ("GPT", "GPTConfig"):
        from gpt import model

        return getattr(model, name)
    raise AttributeError(f"module 'gpt' has no attribute {name!r}")
