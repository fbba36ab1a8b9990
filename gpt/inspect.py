"""Attention maps as pictures: what each head of each layer looks at.

    python -m gpt.inspect --out_dir=out/shakespeare_char --prompt="ROMEO: But soft"
    python -m gpt.inspect --out_dir=out/shakespeare_char --prompt="ROMEO:" --layers=0,3 --heads=0,1 --summary
    python -m gpt.inspect --init_from=gpt2 --prompt="The cat sat on the mat because it"   # needs the network

attention.png is a grid of heat maps, one per layer (rows) and head (columns):
row i, column j is how much the token at position i attends to the token at
position j when computing its next-token prediction. Every row sums to 1; the
upper triangle is empty because of the causal mask (a token never sees later
ones). A masked LM (lm.objective = "mlm", BERT's) reads both ways: its maps are
full squares (row i is what position i looks at to fill in its own token), and
the distance statistic counts tokens on either side. A prefix LM is drawn as it
reads when it generates: causally. Look for heads that attend to the previous token (a bright diagonal
just below the main one), to the first token (a bright first column: a place to
"park" attention), or to the same token earlier in the text (duplicate-token heads).
An induction head looks one further: from the current token to the token that
*followed* an earlier copy of it (at j + 1 where token j equals the current one),
which it then predicts; it shows on repeated text, as a bright diagonal offset
from the main one by the length of the repeat.

--summary adds attention_summary.png: three statistics per head over longer text
(the run's validation data, or --summary_text FILE): the mean attention distance
(how far back a head looks), the entropy of its attention (nats: 0 = all on one
token, high = spread out), and the share of attention on the first token.

The probabilities come from the model's own attention code (GPT.attention_probabilities,
an explicit computation tested against the fused kernel), not from a copy. They take
n_layer x n_head x T x T numbers for a prompt of T tokens: both pictures' files and the
memory this takes are checked before the model runs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from gpt.atomic import check_outputs
from gpt.checkpoint import add_model_options, load_language_model
from gpt.dataset import TokenDataset
from gpt.errors import ArgumentParser, UserError, exit_on_user_error
from gpt.model import GPT, forward_bytes
from gpt.system import check_memory, pick_device
from gpt.tokenizer import Tokenizer

WHITESPACE = {" ": "␣", "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def token_label(tok: Tokenizer, token: int) -> str:
    """A readable axis label for one token: whitespace shown, control characters escaped."""
    if token == tok.eot_token:
        return "<eot>"
    text = tok.token_bytes(token).decode("utf-8", errors="replace")
    return "".join(WHITESPACE.get(c, c if c.isprintable() else c.encode("unicode_escape").decode()) for c in text)


def head_statistics(probs: torch.Tensor, both_ways: bool = False) -> dict[str, np.ndarray]:
    """Per-head statistics of attention probabilities (n_layer, B, n_head, T, T), averaged over
    the batch and over query positions: (n_layer, n_head) arrays. both_ways: the attention of a
    masked LM, whose distances count later tokens too."""
    T = probs.size(-1)
    pos = torch.arange(T, dtype=probs.dtype)
    offset = pos[:, None] - pos[None, :]  # query - key: tokens back
    distance = (probs * (offset.abs() if both_ways else offset.clamp(min=0))).sum(-1)  # (L, B, H, T)
    entropy = -(probs * probs.clamp(min=1e-12).log()).sum(-1)
    first = probs[..., 1:, 0]  # (causal: query 0 can only attend to itself)
    return {
        f"mean attention distance (tokens {'either side' if both_ways else 'back'})": distance.mean(dim=(1, 3)).numpy(),
        "attention entropy (nats)": entropy.mean(dim=(1, 3)).numpy(),
        "attention on the first token": first.mean(dim=(1, 3)).numpy(),
    }


def statistics_table(stats: dict[str, np.ndarray]) -> str:
    """head_statistics (averaged) as text: one line per layer and head."""
    names = list(stats)
    lines = ["layer  head  " + "  ".join(names)]
    layers, heads = stats[names[0]].shape
    for layer in range(layers):
        for head in range(heads):
            cells = [f"{stats[name][layer, head]:>{len(name)}.3f}" for name in names]
            lines.append(f"{layer:>5}  {head:>4}  " + "  ".join(cells))
    return "\n".join(lines)


def _pick(text: str | None, count: int, what: str) -> list[int]:
    if not text:
        return list(range(count))
    try:
        picked = [int(v) for v in text.split(",")]
    except ValueError:
        raise UserError(f"--{what}={text} must be comma-separated numbers, e.g. 0,1") from None
    wrong = [v for v in picked if not 0 <= v < count]
    if wrong:
        raise UserError(f"--{what}={text}: {wrong[0]} is out of range; the model has {count} {what} (0 to {count - 1})")
    return picked


def summary_tokens(args, tok: Tokenizer, run_data: str | None, block_size: int) -> torch.Tensor:
    """Up to 8 windows of block_size tokens of longer text, for the per-head statistics."""
    if args.summary_text:
        try:
            ids = tok.encode(Path(args.summary_text).read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise UserError(f"--summary_text {args.summary_text} is not UTF-8 text: save it as UTF-8") from None
    elif run_data is not None:
        data = TokenDataset(run_data, "val")
        data.check(1, tok.text_vocab_size)  # token ids the model has no embedding for: a damaged file
        ids = np.asarray(data.tokens[: 8 * block_size], dtype=np.int64).tolist()
    else:
        raise UserError("--summary needs longer text: give --summary_text=FILE")
    n = min(8, len(ids) // block_size)
    if n == 0:
        raise UserError(f"the summary text has {len(ids)} tokens, fewer than block_size = {block_size}: give a longer one")
    return torch.tensor(ids[: n * block_size]).view(n, block_size)


def check_inspect_memory(model: GPT, T: int, summary_T: int | None, maps: int, device: torch.device) -> None:
    """Refuse, before the model runs, attention maps that do not fit in memory. On `device`: the
    explicit forward pass (forward_bytes) of the prompt's T tokens and, for --summary, of one
    window of summary_T tokens. In the computer's memory: the picture (matplotlib keeps a copy of
    each of the `maps` drawn maps and makes two more to save one), the summary's statistics (a few
    temporaries the size of a window's probabilities), and the probabilities copied from a GPU."""
    L, H = model.config.n_layer, model.config.attention_heads
    pair = 4 * L * H  # bytes of the float32 probabilities of one (query, key) pair, every layer and head
    on_device = forward_bytes(model.config, 1, T, explicit=True)
    on_host = 4 * (maps + 2) * T * T
    if summary_T:
        on_device += forward_bytes(model.config, 1, summary_T, explicit=True)
        on_host += 3 * pair * summary_T**2
    if device.type != "cpu":
        on_host += pair * (T**2 + (summary_T or 0) ** 2)
    work = f"drawing the attention of {T:,} tokens ({L} layers x {H} heads x {T:,} x {T:,} probabilities)"
    advice = "give a shorter --prompt (a few hundred tokens draw readably)"
    if device.type == "cpu":
        check_memory(on_device + on_host, device, work, advice)
    else:
        check_memory(on_device, device, work, advice)
        check_memory(on_host, torch.device("cpu"), work, advice)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(prog="python -m gpt.inspect", description=__doc__.split("\n\n")[0])
    add_model_options(p, ckpt_default="best.pt")  # the pictures go to --out_dir (or --out)
    p.add_argument("--prompt", required=True, help="the text whose attention is drawn (a short one reads best)")
    p.add_argument("--layers", help="layers to draw, e.g. 0,2 (default: all)")
    p.add_argument("--heads", help="heads to draw, e.g. 0,1 (default: all)")
    p.add_argument("--out", help="the picture (default: OUT_DIR/attention.png, or ./attention.png)")
    p.add_argument("--summary", action="store_true", help="also draw per-head statistics (attention_summary.png, "
                   "beside the attention picture)")
    p.add_argument("--summary_text", help="the text for --summary (default: the run's validation data)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, ...: the explicit attention path is small")
    args = p.parse_args(argv)
    if not args.prompt:
        raise UserError("--prompt is empty: give the text whose attention to draw")

    picture = Path(args.out or Path(args.out_dir or ".") / "attention.png")
    summary_picture = picture.with_name("attention_summary.png")
    if not args.out_dir or Path(args.out_dir).is_dir():  # (a missing run: loading the model says so)
        check_outputs([("--out", picture)] + ([("--summary (beside --out)", summary_picture)] if args.summary else []))

    device = pick_device(args.device)
    model, tok, run_data, objective = load_language_model(args, device, objectives=("causal", "prefix", "mlm"))
    both_ways = objective == "mlm"  # a masked LM reads every token both ways; the others are drawn causally
    layers = _pick(args.layers, model.config.n_layer, "layers")
    heads = _pick(args.heads, model.config.attention_heads, "heads")
    ids = tok.encode(args.prompt)
    limit = model.max_context() or len(ids)
    if len(ids) > limit:
        print(f"note: the prompt has {len(ids)} tokens, more than the model reads at once ({limit}): "
              f"drawing its last {limit}", file=sys.stderr)
        ids = ids[-limit:]
    windows = summary_tokens(args, tok, run_data, model.config.block_size).to(device) if args.summary else None
    check_inspect_memory(model, len(ids), None if windows is None else windows.size(1), len(layers) * len(heads), device)

    from gpt.plot import plot_attention, plot_attention_summary

    def attention(idx):
        return model.attention_probabilities(idx, prefix=idx.size(1) if both_ways else None).float().cpu()

    probs = attention(torch.tensor([ids], device=device))[:, 0]  # (L, H, T, T)
    plot_attention(probs.numpy(), [token_label(tok, i) for i in ids], picture, layers, heads, causal=not both_ways)
    if windows is not None:
        per_window = [head_statistics(attention(w[None]), both_ways) for w in windows]
        stats = {name: np.mean([s[name] for s in per_window], axis=0) for name in per_window[0]}
        print(f"per head, averaged over {len(windows)} windows of {windows.size(1)} tokens:")
        print(statistics_table(stats))
        plot_attention_summary(stats, summary_picture)


if __name__ == "__main__":
    main()
