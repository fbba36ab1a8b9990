"""The architecture experiments of benchmarks/RESULTS.md, on the shipped Shakespeare (char).

    python benchmarks/architecture_experiments.py positions   # length extrapolation (~25 min, 2-core CPU)
    python benchmarks/architecture_experiments.py norms       # pre-/post-norm, RMSNorm, warmup (~20 min)
    python benchmarks/architecture_experiments.py recipe      # candidates for the Quickstart config
    python benchmarks/architecture_experiments.py optimizers  # Muon vs AdamW Quickstart, alternating (~16 min)
    python benchmarks/architecture_experiments.py positions --max_iters=100   # a quick look

positions: the Quickstart model with its AdamW recipe (configs/shakespeare_char_adamw.toml,
block_size 128; every experiment here but "optimizers" uses that config) trained
once per position scheme with the same budget, then evaluated on the validation split at
contexts 128, 256, 512 and 1024: non-overlapping windows over the whole split, and
sliding windows (stride 64) over its first 32,768 tokens. Learned positions cannot read
past 128, so they have one point. (The ALiBi paper's Table 2 at a small scale.)

norms: 8-layer versions of that model with pre-LayerNorm, post-LayerNorm and pre-RMSNorm,
each with and without the learning-rate warmup; training loss curves in one picture.

recipe: the Quickstart config against switched versions of it, trained in turn on this
machine; wall time and validation loss of each.

optimizers: the Quickstart (Muon and AdamW) against its plain-AdamW recipe
(configs/shakespeare_char_adamw.toml), alternating, so that both see the same machine.

Each run is `python train.py` in a subprocess (out/experiments/NAME), timed from start to
exit. Results go to benchmarks/results/EXPERIMENT.json and pictures to docs/.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from gpt.checkpoint import load_model  # noqa: E402
from gpt.dataset import TokenDataset  # noqa: E402
from gpt.evaluate import evaluate_tokens  # noqa: E402
from gpt.positions import POSITIONS  # noqa: E402

# the Quickstart's AdamW recipe: what these experiments were measured with (the Quickstart now uses Muon)
CONFIG = ROOT / "configs" / "shakespeare_char_adamw.toml"
OUT = ROOT / "out" / "experiments"
CONTEXTS = (128, 256, 512, 1024)
SLIDING_TOKENS, SLIDING_STRIDE = 32_768, 64


def train(name: str, overrides: list[str], max_iters: int | None, script: tuple[str, ...] = ("train.py",),
          config: Path = CONFIG) -> dict:
    """One train.py run (or `script`, which takes train.py's arguments) of `config`; its wall
    time, final validation loss and the step losses."""
    out = OUT / name
    argv = [sys.executable, *script, str(config), f"--run.out_dir={out}", "--log.plot=false", "--overwrite", *overrides]
    if max_iters:
        argv.append(f"--run.max_iters={max_iters}")
    print(f"== {name}: {' '.join(overrides) or '(the config as is)'}", flush=True)
    start = time.perf_counter()
    subprocess.run(argv, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_loss" in r]
    steps = [(r["iter"], r["loss"]) for r in records if "loss" in r]
    print(f"   {seconds:.0f} s, val loss {evals[-1]['val_loss']:.4f}", flush=True)
    ms = sorted(r["ms_per_iter"] for r in records if "ms_per_iter" in r)
    return {"name": name, "overrides": overrides, "seconds": seconds, "val_loss": evals[-1]["val_loss"],
            "iters": steps[-1][0], "steps": steps, "ms_per_iter": ms[len(ms) // 2] if ms else None}


def positions(args) -> dict:
    val = TokenDataset(ROOT / "data" / "shakespeare" / "char", "val").tokens
    runs = []
    for scheme in POSITIONS:
        run = train(f"position_{scheme}", [f"--model.position={scheme}"], args.max_iters)
        model, tok, _ = load_model(OUT / run["name"] / "ckpt.pt")
        lengths = tok.byte_lengths()
        limit = model.max_context()
        run["contexts"] = {}
        for c in CONTEXTS:
            if limit is not None and c > limit:
                continue
            whole = evaluate_tokens(model, val, "val", c, c, byte_lengths=lengths, progress=False)
            sliding = evaluate_tokens(model, val[:SLIDING_TOKENS], "val", c, SLIDING_STRIDE, byte_lengths=lengths,
                                      progress=False)
            run["contexts"][c] = {"non_overlapping": whole.loss, "sliding": sliding.loss}
            print(f"   context {c}: {whole.loss:.4f} non-overlapping, {sliding.loss:.4f} sliding", flush=True)
        runs.append(run)
    draw_positions(runs, ROOT / "docs" / "length_extrapolation.png")
    return {"runs": runs}


def norms(args) -> dict:
    variants = {"pre-LayerNorm": [], "post-LayerNorm": ["--model.norm_position=post"], "pre-RMSNorm": ["--model.norm=rmsnorm"]}
    runs = []
    for label, switches in variants.items():
        for warmup in (True, False):
            name = f"norm_{label}_{'warmup' if warmup else 'nowarmup'}".replace("-", "_")
            run = train(name, ["--model.n_layer=8", *switches, *([] if warmup else ["--optim.warmup_iters=0"])],
                        args.max_iters or 600)
            run["label"], run["warmup"] = label, warmup
            runs.append(run)
    draw_norms(runs, ROOT / "docs" / "norms_warmup.png")
    return {"runs": runs}


def optimizers(args) -> dict:
    """The Quickstart (Muon, configs/shakespeare_char.toml) and its plain-AdamW recipe
    (configs/shakespeare_char_adamw.toml), alternating, args.rounds times each."""
    runs = []
    for round_ in range(args.rounds):
        for name in ("adamw", "muon"):
            config = ROOT / "configs" / ("shakespeare_char_adamw.toml" if name == "adamw" else "shakespeare_char.toml")
            run = train(f"optimizers_{name}_{round_}", [], args.max_iters, config=config)
            run["recipe"], run["round"] = name, round_
            runs.append(run)
    return {"runs": runs}


def recipe(args) -> dict:
    candidates = {"baseline": [], "rope": ["--model.position=rope"], "rope_rmsnorm": ["--model.position=rope", "--model.norm=rmsnorm"],
                  "alibi": ["--model.position=alibi"]}
    return {"runs": [train(f"recipe_{name}", switches, args.max_iters) for name, switches in candidates.items()]}


def draw_positions(runs: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, kind, title in zip(axes, ("non_overlapping", "sliding"), ("non-overlapping windows", f"sliding windows (stride {SLIDING_STRIDE})")):
        for run in runs:
            xs = sorted(run["contexts"])
            single = len(xs) == 1  # learned positions: one point, drawn large so it shows
            ax.plot(xs, [run["contexts"][c][kind] for c in xs], "*" if single else "o-", markersize=14 if single else 6,
                    zorder=3 if single else 2, label=run["name"].removeprefix("position_"))
        ax.set_xscale("log", base=2)
        ax.set_xticks(CONTEXTS, [str(c) for c in CONTEXTS])
        ax.axvline(128, color="gray", lw=0.8, ls=":")
        ax.set_title(title)
        ax.set_xlabel("evaluation context (tokens); trained at 128")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation loss (nats per character)")
    axes[0].set_ylim(top=min(4.5, axes[0].get_ylim()[1]))
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    print(f"wrote {png}")


def draw_norms(runs: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8))
    colors = {"pre-LayerNorm": "tab:blue", "post-LayerNorm": "tab:red", "pre-RMSNorm": "tab:green"}
    for run in runs:
        iters, losses = zip(*run["steps"])  # the logged steps (every log.log_interval = 50)
        ax.plot(iters, losses, marker="o", ms=3, color=colors[run["label"]], ls="-" if run["warmup"] else "--",
                label=f"{run['label']}, {'warmup 100' if run['warmup'] else 'no warmup'} (val {run['val_loss']:.3f})")
    ax.set_xlabel("iteration")
    ax.set_ylabel("training loss (one batch, every 50 steps)")
    ax.set_ylim(1.2, 3.5)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    print(f"wrote {png}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("experiment", choices=["positions", "norms", "recipe", "optimizers"])
    p.add_argument("--rounds", type=int, default=2, help="optimizers: runs of each recipe, alternating")
    p.add_argument("--max_iters", type=int, help="override the runs' length (default: the config's; norms: 600)")
    p.add_argument("--redraw", action="store_true", help="only draw the picture again from the saved results")
    args = p.parse_args()
    if args.redraw:
        saved = json.loads((ROOT / "benchmarks" / "results" / f"{args.experiment}.json").read_text())
        for run in saved["runs"]:  # JSON keys are strings
            run["contexts"] = {int(c): v for c, v in run.get("contexts", {}).items()}
        draw = {"positions": (draw_positions, "length_extrapolation.png"), "norms": (draw_norms, "norms_warmup.png")}
        function, png = draw[args.experiment]
        function(saved["runs"], ROOT / "docs" / png)
        return
    results = {"positions": positions, "norms": norms, "recipe": recipe, "optimizers": optimizers}[args.experiment](args)
    results["torch"], results["machine"] = torch.__version__, f"{torch.get_num_threads()} CPU threads"
    path = ROOT / "benchmarks" / "results" / f"{args.experiment}.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {path}")
    for run in results["runs"]:
        extra = "  ".join(f"{c}: {v['non_overlapping']:.4f}/{v['sliding']:.4f}" for c, v in run.get("contexts", {}).items())
        print(f"{run['name']:<36} {run['seconds']:6.0f} s  val {run['val_loss']:.4f}  {extra}")


if __name__ == "__main__":
    main()
