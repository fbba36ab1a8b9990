"""A smoke run: train a tiny GPT for a few dozen steps on real text and print the loss.

    python -m gpt.smoke [--steps 200] [--tokenizer byte|char|gpt2] [--device cpu|cuda|mps]

It exercises the pieces that exist so far on whatever device you have: a
tokenizer, the model's forward and backward pass, and greedy decoding on the
KV cache. The text is this package's own source code. The default (byte
tokenizer, 200 steps) takes 20-40 seconds on a 2-core CPU; gpt2's 50k-row
embedding makes each step ~25x slower there. It is the Quickstart's first
command until train.py lands.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from gpt.errors import UserError, exit_on_user_error
from gpt.model import GPT, GPTConfig
from gpt.tokenizer import get_tokenizer


def get_batch(data: torch.Tensor, batch_size: int, block_size: int, g: torch.Generator):
    starts = torch.randint(0, len(data) - block_size - 1, (batch_size,), generator=g)
    x = torch.stack([data[s : s + block_size] for s in starts])
    y = torch.stack([data[s + 1 : s + 1 + block_size] for s in starts])
    return x, y


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="optimiser steps (default 200)")
    parser.add_argument("--tokenizer", default="byte", help="byte (default), char or gpt2")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=1337)
    args = parser.parse_args(argv)
    if args.steps < 1:
        raise UserError(f"--steps must be at least 1, got {args.steps}")
    try:
        torch.empty(0, device=args.device)
    except (RuntimeError, AssertionError) as e:
        raise UserError(f"device {args.device!r} is not usable here ({str(e).splitlines()[0]}): try --device cpu") from None

    torch.manual_seed(args.seed)
    text = "\n".join(p.read_text(encoding="utf-8") for p in sorted(Path(__file__).parent.glob("*.py")))
    tok = get_tokenizer(args.tokenizer, text=text)
    data = torch.tensor(tok.encode(text), dtype=torch.long)
    n_val = len(data) // 10
    train, val = data[:-n_val], data[-n_val:]
    config = GPTConfig(block_size=128, vocab_size=tok.vocab_size, n_layer=3, n_head=4, n_embd=128)
    model = GPT(config).to(args.device)
    print(f"smoke run: {model.num_params() / 1e6:.2f}M-parameter GPT on {len(train):,} {tok.name} tokens "
          f"of this package's source, device {args.device}")

    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(args.seed)
    batch_size, t0 = 16, time.perf_counter()
    for step in range(1, args.steps + 1):
        x, y = (t.to(args.device) for t in get_batch(train, batch_size, config.block_size, g))
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step == 1 or step % 25 == 0 or step == args.steps:
            model.eval()
            with torch.no_grad():
                xv, yv = (t.to(args.device) for t in get_batch(val, 32, config.block_size, g))
                val_loss = model(xv, yv)[1].item()
            model.train()
            tok_s = step * batch_size * config.block_size / (time.perf_counter() - t0)
            print(f"step {step:4d} | loss {loss.item():.3f} | val loss {val_loss:.3f} | {tok_s:,.0f} tokens/s")

    model.eval()
    prompt = "def forward(self"
    ids = torch.tensor([tok.encode(prompt)], device=args.device)
    cache = model.new_kv_cache(1)
    with torch.no_grad():
        logits, _ = model(ids, kv_cache=cache)
        out = []
        for _ in range(80):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            out.append(nxt.item())
            logits, _ = model(nxt, kv_cache=cache)
    print(f"greedy continuation of {prompt!r}:\n{prompt}{tok.decode(out)}")


if __name__ == "__main__":
    main()
