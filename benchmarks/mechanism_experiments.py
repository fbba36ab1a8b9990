"""The attention-mechanism experiments of benchmarks/RESULTS.md (gpt/attention.py), on the shipped
Shakespeare (char), one seed per cell.

    python benchmarks/mechanism_experiments.py mechanisms      # the mechanism table (~30 min, 2-core CPU)
    python benchmarks/mechanism_experiments.py focus           # can linear attention focus? (needs mechanisms)
    python benchmarks/mechanism_experiments.py gau             # post-norm GAU stacks without warmup (~15 min)
    python benchmarks/mechanism_experiments.py extrapolation   # RoPE + window + log-n past the training length (~15 min)
    python benchmarks/mechanism_experiments.py scale           # 1/sqrt(d) or no scale, head dimension 64 (~8 min)
    python benchmarks/mechanism_experiments.py patterns        # sparse patterns with 16 keys per query (~12 min)
    python benchmarks/mechanism_experiments.py mechanisms --max_iters=100   # a quick look

mechanisms: the Quickstart model and budget (its AdamW recipe, configs/shakespeare_char_adamw.toml, 1700 steps) with
GPT-2's learned positions (linear attention and the Synthesizers take no RoPE), once per
attention mechanism, and a GAU stack with about the same parameters: parameters, ms per
step, validation loss, loss by position in a 128-character window.

focus: for the softmax and linear models of `mechanisms`, the normalised entropy of each
head's attention (H / log n, 1 = uniform over the n visible keys), the rank of its causal
attention matrix, and a copy probe for every mechanism: 64 strings of 48 characters (random
letters, and passages of the validation text), each repeated once; next-character accuracy
on the repeat (a model that finds the one earlier occurrence of the current string and reads
the character after it gets it right) against the first copy (no such help).

gau: post-norm GAU stacks of 8 and 24 layers, no warmup, Xavier-uniform linear weights, at
the norms experiment's settings (learned positions, 600 steps at the peak lr 4e-3), beside
that experiment's post-norm Transformer without warmup (rerun here); and each GAU's
||GAU(x)|| / ||x|| per layer at initialisation.

extrapolation: RoPE trained at 128 (the Quickstart), evaluated at 128-1024 characters with
full attention and with an evaluation-time window of 128; RoPE trained with log-n scaling,
evaluated the same two ways; RoPE without the 1/sqrt(d) scale. Beside ALiBi's line from
benchmarks/results/positions.json.

scale: head dimension 64 (2 heads of the Quickstart's 128) with the 1/sqrt(d) scale and
without: attention entropy at initialisation and after training, and the loss curves.

patterns: the Quickstart with every query limited to 16 keys, by a window, a dilated and a
strided pattern, beside full attention: what a sparse pattern costs for a fixed number of keys.

Each run is train.py in a subprocess (out/experiments/NAME). Results go to
benchmarks/results/mechanisms_EXPERIMENT.json and pictures to docs/.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

from architecture_experiments import CONTEXTS, OUT, ROOT, train  # also puts the project on sys.path

from gpt.checkpoint import load_model  # noqa: E402
from gpt.dataset import TokenDataset  # noqa: E402
from gpt.evaluate import evaluate_tokens  # noqa: E402
from gpt.model import GPT, GPTConfig  # noqa: E402

LEARNED = ["--model.position=learned"]
MECHANISMS = {
    "softmax": [],
    "linear": ["--model.attention=linear"],
    "synthesizer_dense": ["--model.attention=synthesizer_dense"],
    "synthesizer_random": ["--model.attention=synthesizer_random"],
    "synthesizer_random_fixed": ["--model.attention=synthesizer_random_fixed"],
    "synthesizer_random+softmax": ["--model.attention=synthesizer_random+softmax"],
}
XAVIER = (str(Path(__file__).resolve()), "xavier-train")  # train.py with Xavier-uniform linear weights


DATA = ROOT / "data" / "shakespeare" / "char"


def validation():
    return TokenDataset(DATA, "val").tokens


def vocab_size() -> int:
    return TokenDataset(DATA, "val").meta["vocab_size"]


def gau_layers_like(transformer_layers: int = 4) -> int:
    """The GAU layer count whose parameters come closest to the Quickstart's transformer layers."""
    base = dict(block_size=128, vocab_size=vocab_size(), n_embd=128, n_head=4, position="learned")
    target = GPTConfig(n_layer=transformer_layers, **base).parameter_count()
    return min(range(1, 4 * transformer_layers), key=lambda n: abs(GPTConfig(n_layer=n, block="gau", **base).parameter_count() - target))


def loaded(name: str) -> GPT:
    model, _, _ = load_model(OUT / name / "best.pt")
    return model.eval()


def mechanisms(args) -> dict:
    variants = {**MECHANISMS, "gau": ["--model.block=gau", f"--model.n_layer={gau_layers_like()}"]}
    val, runs = validation(), []
    if args.only:  # rerun some variants; the others' results come from the last full run
        saved = json.loads((ROOT / "benchmarks" / "results" / "mechanisms_mechanisms.json").read_text())["runs"]
        runs = [r for r in saved if r["name"].removeprefix("mechanism_") not in args.only.split(",")]
        variants = {name: switches for name, switches in variants.items() if name in args.only.split(",")}
    for name, switches in variants.items():
        run = train(f"mechanism_{name}", LEARNED + switches, args.max_iters)
        model, tok, _ = load_model(OUT / run["name"] / "best.pt")
        run["parameters"] = model.num_params()
        result = evaluate_tokens(model, val, "val", 128, 128, byte_lengths=tok.byte_lengths(), progress=False)
        run["eval_loss_128"], run["position_loss"] = result.loss, result.position_loss
        print(f"   {run['parameters']:,} parameters, {run['ms_per_iter']:.0f} ms/step, loss at 128: {result.loss:.4f}")
        runs.append(run)
    order = [f"mechanism_{name}" for name in [*MECHANISMS, "gau"]]
    runs.sort(key=lambda r: order.index(r["name"]))
    draw_position_loss(runs, ROOT / "docs" / "mechanisms.png")
    return {"runs": runs}


@torch.no_grad()
def entropy_and_rank(model: GPT, windows: torch.Tensor) -> dict:
    """Per head: mean normalised entropy H / log n of each query's attention (queries that see
    n >= 2 keys), and the mean numerical rank / T of the causal attention matrix."""
    probs = model.attention_probabilities(windows).double()  # (L, B, H, T, T)
    T = probs.size(-1)
    n = torch.arange(1, T + 1, dtype=torch.float64)
    entropy = -(probs * probs.clamp(min=1e-30).log()).sum(-1)[..., 1:] / n[1:].log()  # (L, B, H, T - 1)
    rank = torch.linalg.matrix_rank(probs).double() / T  # (L, B, H)
    return {"entropy": entropy.mean(dim=(1, 3)).tolist(), "rank": rank.mean(dim=1).tolist()}


@torch.no_grad()
def copy_accuracy(model: GPT, strings: torch.Tensor) -> dict:
    """Next-character accuracy on the first and the second copy of each string (rows of `strings`)."""
    length = strings.size(1)
    text = strings.repeat(1, 2)  # (strings, 2 x length)
    predicted = model.logits(model.hidden_states(text[:, :-1])).argmax(-1)
    right = predicted == text[:, 1:]  # right[:, i]: character i + 1 predicted from 0..i
    return {"first_copy": right[:, : length - 1].float().mean().item(), "second_copy": right[:, length:].float().mean().item()}


def probe_strings(tok, generator: torch.Generator, strings: int = 64, length: int = 48) -> dict[str, torch.Tensor]:
    """Random lowercase letters (no help from Shakespeare; repeated 8 and 48 characters later)
    and passages of the validation text."""
    letters = torch.tensor(tok.encode("abcdefghijklmnopqrstuvwxyz"))
    val = torch.from_numpy(validation().astype("int64"))
    starts = torch.randint(len(val) - length, (strings,), generator=generator)
    return {"random_letters_8": letters[torch.randint(len(letters), (strings, 8), generator=generator)],
            "random_letters": letters[torch.randint(len(letters), (strings, length), generator=generator)],
            "validation_text": torch.stack([val[s : s + length] for s in starts.tolist()])}


def focus(args) -> dict:
    val = torch.from_numpy(validation()[:8 * 128].astype("int64")).view(8, 128)
    _, tok, _ = load_model(OUT / "mechanism_softmax" / "best.pt")
    probes = probe_strings(tok, torch.Generator().manual_seed(0))
    results = {}
    for name in [*MECHANISMS, "gau"]:
        model = loaded(f"mechanism_{name}")
        results[name] = {probe: copy_accuracy(model, strings) for probe, strings in probes.items()}
        if name in ("softmax", "linear"):
            results[name].update(entropy_and_rank(model, val))
        line = "; ".join(f"{p}: {r['first_copy']:.3f} -> {r['second_copy']:.3f}" for p, r in results[name].items() if p in probes)
        if "entropy" in results[name]:
            line += (f"; entropy per layer {[round(sum(h) / len(h), 3) for h in results[name]['entropy']]}, rank "
                     f"{[round(sum(h) / len(h), 3) for h in results[name]['rank']]}")
        print(f"{name:28} {line}")
    return {"models": results}


def xavier_train(argv: list[str]) -> None:
    """train.py with every linear weight but the (embedding-tied) LM head Xavier-uniform."""
    import train as train_script

    original = GPT.reset_parameters

    def reset_parameters(self):
        original(self)
        for name, module in self.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                torch.nn.init.xavier_uniform_(module.weight)

    GPT.reset_parameters = reset_parameters
    train_script.main(argv)


@torch.no_grad()
def gau_output_ratio(n_layer: int) -> list[float]:
    """||GAU(x)|| / ||x|| of each layer at Xavier initialisation, on a batch of validation text."""
    config = GPTConfig(block_size=128, vocab_size=vocab_size(), n_embd=128, n_head=4, n_layer=n_layer, block="gau",
                       norm_position="post", position="learned")
    torch.manual_seed(0)
    model = GPT(config)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            torch.nn.init.xavier_uniform_(module.weight)
    ratios = []
    hooks = [block.attn.register_forward_hook(lambda m, inputs, out: ratios.append((out.norm() / inputs[0].norm()).item()))
             for block in model.transformer.h]
    model.hidden_states(torch.from_numpy(validation()[: 4 * 128].astype("int64")).view(4, 128))
    for hook in hooks:
        hook.remove()
    return ratios


def gau(args) -> dict:
    steps = args.max_iters or 600
    common = LEARNED + ["--model.norm_position=post", "--optim.warmup_iters=0"]
    runs = [train("gau_transformer8_post_nowarmup", common + ["--model.n_layer=8"], steps)]
    for layers in (8, 24):
        run = train(f"gau{layers}_post_nowarmup_xavier", common + ["--model.block=gau", f"--model.n_layer={layers}"],
                    steps, script=XAVIER)
        run["output_ratio_at_init"] = gau_output_ratio(layers)
        print(f"   ||GAU(x)|| / ||x|| at init: mean {sum(run['output_ratio_at_init']) / layers:.2e}")
        runs.append(run)
    draw_curves(runs, ROOT / "docs" / "gau_warmup.png", "post-norm, no warmup, 600 steps at lr 4e-3")
    return {"runs": runs}


def evaluate_windows(name: str, val, windows: list[int]) -> dict:
    """Loss at each context of CONTEXTS (non-overlapping windows over the split), per window setting."""
    model, tok, _ = load_model(OUT / name / "best.pt")
    model.eval()
    curves = {}
    for window in windows:
        model.config = replace(model.config, attention_window=window)  # read by the masks at every forward
        curves[str(window or "full")] = {c: evaluate_tokens(model, val, "val", c, c, byte_lengths=tok.byte_lengths(),
                                                            progress=False).loss for c in CONTEXTS}
        print(f"   window {window or 'full'}: " + ", ".join(f"{c}: {v:.4f}" for c, v in curves[str(window or 'full')].items()))
    return curves


def extrapolation(args) -> dict:
    val, runs = validation(), []
    for name, switches, windows in (("rope", [], [0, 128]), ("rope_logn", ["--model.attention_scale=logn"], [0, 128]),
                                    ("rope_unscaled", ["--model.attention_scale=one"], [0])):
        run = train(f"extrapolation_{name}", switches, args.max_iters)
        run["contexts"] = evaluate_windows(run["name"], val, windows)
        runs.append(run)
    alibi = ROOT / "benchmarks" / "results" / "positions.json"
    reference = next((r for r in json.loads(alibi.read_text())["runs"] if r["name"] == "position_alibi"), None)
    draw_extrapolation(runs, reference, ROOT / "docs" / "extrapolation_window_logn.png")
    return {"runs": runs, "alibi": reference and {c: v["non_overlapping"] for c, v in reference["contexts"].items()}}


def patterns(args) -> dict:
    """The Quickstart (RoPE), each query limited to 16 keys: the 16 most recent, every 4th over 64
    characters (dilated), or the 4 most recent plus every 4th over 52 (strided); and full attention."""
    variants = {"full": [], "window16": ["--model.attention_window=16"],
                "dilated4_16": ["--model.attention_pattern=dilated", "--model.attention_stride=4", "--model.attention_window=16"],
                "strided4_13": ["--model.attention_pattern=strided", "--model.attention_stride=4", "--model.attention_window=13"]}
    return {"runs": [train(f"pattern_{name}", switches, args.max_iters) for name, switches in variants.items()]}


@torch.no_grad()
def mean_entropy(model: GPT, windows: torch.Tensor) -> float:
    return sum(sum(h) / len(h) for h in entropy_and_rank(model, windows)["entropy"]) / model.config.n_layer


def scale(args) -> dict:
    val = torch.from_numpy(validation()[:8 * 128].astype("int64")).view(8, 128)
    runs = []
    for name in ("sqrt_d", "one"):
        switches = ["--model.n_head=2", f"--model.attention_scale={name}"]
        torch.manual_seed(1337)
        fresh = GPT(GPTConfig(block_size=128, vocab_size=vocab_size(), n_layer=4, n_head=2, n_embd=128, position="rope",
                              attention_scale=name)).eval()
        run = train(f"scale_{name}", switches, args.max_iters)
        run["entropy_at_init"], run["entropy_trained"] = mean_entropy(fresh, val), mean_entropy(loaded(run["name"]), val)
        print(f"   normalised attention entropy: {run['entropy_at_init']:.3f} at init, {run['entropy_trained']:.3f} trained")
        runs.append(run)
    draw_curves(runs, ROOT / "docs" / "attention_scale.png", "head dimension 64: scores / sqrt(64) or unscaled")
    return {"runs": runs}


def draw_position_loss(runs: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8))
    for run in runs:
        losses = run["position_loss"]
        ax.plot(range(1, len(losses) + 1), losses, label=f"{run['name'].removeprefix('mechanism_')} ({run['eval_loss_128']:.3f})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("characters of context (position in a 128-character window)")
    ax.set_ylabel("validation loss (nats per character)")
    ax.set_ylim(1.3, 3.3)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    print(f"wrote {png}")


def draw_curves(runs: list[dict], png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8))
    for run in runs:
        iters, losses = zip(*run["steps"])
        ax.plot(iters, losses, marker="o", ms=3, label=f"{run['name']} (val {run['val_loss']:.3f})")
    ax.set_title(title)
    ax.set_xlabel("iteration")
    ax.set_ylabel("training loss (one batch, every 50 steps)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    print(f"wrote {png}")


def draw_extrapolation(runs: list[dict], alibi: dict | None, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8))
    for run in runs:
        for window, curve in run["contexts"].items():
            xs = sorted(int(c) for c in curve)
            ax.plot(xs, [curve[c] for c in xs], "o-", label=f"{run['name'].removeprefix('extrapolation_')}, window {window}")
    if alibi:
        xs = sorted(int(c) for c in alibi["contexts"])
        ax.plot(xs, [alibi["contexts"][str(c)]["non_overlapping"] for c in xs], "k--", label="alibi (positions experiment)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(CONTEXTS, [str(c) for c in CONTEXTS])
    ax.set_xlabel("evaluation context (characters); trained at 128")
    ax.set_ylabel("validation loss (nats per character)")
    ax.set_ylim(1.4, min(4.5, ax.get_ylim()[1]))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    print(f"wrote {png}")


def main():
    if sys.argv[1:2] == ["xavier-train"]:
        return xavier_train(sys.argv[2:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("experiment", choices=["mechanisms", "focus", "gau", "extrapolation", "scale", "patterns"])
    p.add_argument("--max_iters", type=int, help="override the runs' length (default: the config's; gau: 600)")
    p.add_argument("--only", help="mechanisms: rerun these variants (comma-separated), keep the others' saved results")
    args = p.parse_args()
    results = globals()[args.experiment](args)
    results["torch"], results["machine"] = torch.__version__, f"{torch.get_num_threads()} CPU threads"
    path = ROOT / "benchmarks" / "results" / f"mechanisms_{args.experiment}.json"
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
