"""A picture of a run: train and validation loss, and the learning rate, from metrics.jsonl.

    python -m gpt.plot out/shakespeare_char        # writes out/shakespeare_char/loss.png

Needs matplotlib (pip install "gpt[plot]"); without it, a note says so and nothing is written.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from gpt.errors import UserError, exit_on_user_error


def plot_metrics(metrics: Path, png: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed, so no loss.png: pip install 'gpt[plot]'", file=sys.stderr)
        return None
    records = [json.loads(line) for line in Path(metrics).read_text().splitlines() if line]
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
    fig.savefig(png, dpi=120)
    plt.close(fig)
    print(f"wrote {png}")
    return png


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
