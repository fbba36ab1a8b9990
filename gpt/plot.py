"""Every picture the project draws, headless: loss curves, evaluation plots, attention maps.

    python -m gpt.plot out/shakespeare_char        # writes out/shakespeare_char/loss.png

    plot_metrics(metrics_jsonl, png)               # train.py, at the end of every run
    plot_evaluation(results, png)                  # python -m gpt.evaluate --plot
    plot_attention(probs, labels, png)             # python -m gpt.inspect
    plot_attention_summary(stats, png)             # python -m gpt.inspect --summary

matplotlib is imported only when drawing (so importing this module is free) with
the Agg backend (files only, no display). Pictures are written atomically. If
matplotlib is missing, a note says so and nothing is written.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from gpt.atomic import atomic_path
from gpt.errors import UserError, exit_on_user_error


def _pyplot(png: Path):
    """matplotlib.pyplot on the Agg backend, or None (with a note) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"note: matplotlib is not installed, so no {Path(png).name}: pip install matplotlib", file=sys.stderr)
        return None
    return plt


def _save(fig, png: Path, plt) -> Path:
    png = Path(png)
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    print(f"wrote {png}")
    return png


def plot_metrics(metrics: Path, png: Path) -> Path | None:
    """Train and validation loss over iterations, and the learning rate, from metrics.jsonl."""
    plt = _pyplot(png)
    if plt is None:
        return None
    records = []
    for line in Path(metrics).read_text(errors="replace").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a torn last line (a run killed while writing it): the rest still draws
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=(3, 1))
    ax_loss.plot([r["iter"] for r in steps], [r["loss"] for r in steps], lw=0.8, alpha=0.6, label="train (batch)")
    if evals and "train_loss" in evals[0]:
        ax_loss.plot([r["iter"] for r in evals], [r["train_loss"] for r in evals], "o-", label="train (eval)")
    ax_loss.plot([r["iter"] for r in evals], [r["val_loss"] for r in evals], "o-", label="val")
    ax_loss.set_ylabel("loss (nats per token)")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_lr.plot([r["iter"] for r in steps], [r["lr"] for r in steps], color="tab:gray")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("iteration")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, png, plt)


def plot_evaluation(results, png: Path) -> Path | None:
    """gpt.evaluate's results: loss against context length (per set), and loss against the
    position in the window (per set and context): how much each extra token of context helps."""
    plt = _pyplot(png)
    if plt is None:
        return None
    fig, (ax_ctx, ax_pos) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in dict.fromkeys(r.name for r in results):
        mine = sorted((r for r in results if r.name == name), key=lambda r: r.context)
        ax_ctx.plot([r.context for r in mine], [r.loss for r in mine], "o-", label=name)
        for r in mine:
            points = [(p + 1, v) for p, v in enumerate(r.position_loss) if not math.isnan(v)]
            ax_pos.plot(*zip(*points), lw=1, label=f"{name}, context {r.context}")
    ax_ctx.set_xscale("log", base=2)
    ax_ctx.set_xlabel("context length (tokens)")
    ax_ctx.set_ylabel("loss (nats per token)")
    ax_ctx.set_title("loss by context length")
    ax_pos.set_xscale("log", base=2)
    ax_pos.set_xlabel("tokens of context (position in the window + 1)")
    ax_pos.set_ylabel("mean loss at that position")
    ax_pos.set_title("loss by position")
    for ax in (ax_ctx, ax_pos):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, png, plt)


def plot_attention(probs, labels: list[str], png: Path, layers: list[int], heads: list[int],
                   causal: bool = True) -> Path | None:
    """A grid of attention maps, one per (layer, head): row = query token, column = key token,
    colour = attention weight. probs: (n_layer, n_head, T, T) for one sequence; causal: whether
    the model reads left to right (else both ways, a masked LM)."""
    plt = _pyplot(png)
    if plt is None:
        return None
    T = len(labels)
    cell = max(2.2, min(6.0, 0.16 * T + 1.2))
    fig, axes = plt.subplots(len(layers), len(heads), figsize=(cell * len(heads), cell * len(layers)), squeeze=False)
    font = max(4, min(9, 200 // max(T, 1)))
    for row, layer in enumerate(layers):
        for col, head in enumerate(heads):
            ax = axes[row][col]
            ax.imshow(probs[layer][head], cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_title(f"layer {layer}, head {head}", fontsize=9)
            ticks = range(T) if T <= 64 else []
            ax.set_xticks(ticks, [labels[i] for i in ticks], rotation=90, fontsize=font)
            ax.set_yticks(ticks, [labels[i] for i in ticks], fontsize=font)
            if row == len(layers) - 1:
                ax.set_xlabel("key (attended to)", fontsize=8)
            if col == 0:
                ax.set_ylabel("query", fontsize=8)
    fig.suptitle("attention weights (the upper triangle is masked: a token never sees the future)" if causal
                 else "attention weights (a masked LM: every token sees every other)", fontsize=10)
    fig.tight_layout()
    return _save(fig, png, plt)


def plot_attention_summary(stats: dict, png: Path) -> Path | None:
    """Per-head statistics as layer x head grids: stats maps a title to an (n_layer, n_head) array."""
    plt = _pyplot(png)
    if plt is None:
        return None
    fig, axes = plt.subplots(1, len(stats), figsize=(4.5 * len(stats), 4), squeeze=False)
    for ax, (title, values) in zip(axes[0], stats.items()):
        image = ax.imshow(values, cmap="magma", aspect="auto", interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(values.shape[1]))
        ax.set_yticks(range(values.shape[0]))
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    return _save(fig, png, plt)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise UserError("usage: python -m gpt.plot OUT_DIR")
    metrics = Path(args[0]) / "metrics.jsonl"
    if not metrics.exists():
        raise UserError(f"{metrics} does not exist: point to a run's out_dir")
    plot_metrics(metrics, Path(args[0]) / "loss.png")


if __name__ == "__main__":
    main()
