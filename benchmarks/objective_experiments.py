"""The downstream experiments of benchmarks/RESULTS.md: GPT vs BERT vs the prefix LM at equal compute,
and zero-shot vs few-shot vs fine-tuned multiple choice, on the shipped data, one seed per cell.

    python benchmarks/objective_experiments.py objectives   # ~30 min on a 2-core CPU
    python benchmarks/objective_experiments.py shots        # ~75 min
    python benchmarks/objective_experiments.py objectives --reuse   # keep finished runs in out/experiments

objectives: the Quickstart model and budget (its AdamW recipe, configs/shakespeare_char_adamw.toml: 4 x 128, 1700 steps
of 16 x 128 tokens) pretrained on the shipped Shakespeare as bytes (data/shakespeare/byte, so
that the SMS messages' characters have ids) with lm.objective = causal (GPT), mlm (BERT) and
prefix (prefix LM). Measured: each model's own validation loss; the next-byte loss of the
validation split in windows of 128 where it is defined (causal, prefix: read causally); the
masked-token loss (BERT's corruption, gpt.evaluate) for the masked LM; then each pretrained model
and a model from scratch fine-tuned on the SMS Spam Collection (classify, 300 steps of 32
messages, validation macro-F1) and on the shipped next-line multiple choice (multiple_choice,
300 steps of 16 questions, test accuracy); and a sample from the GPT (the only one that can).

shots: the Quickstart model (char; its AdamW recipe, and the Muon one of configs/shakespeare_char.toml)
and a larger char model (AdamW, 6 x 192, block 256, 2000 steps of 16 x 256) on the next-line test
set: zero-shot and 1-, 3- and 5-shot by likelihood (acc and
acc_norm; shots drawn from the train split), the zero-shot score with the context removed (what
the endings alone give), and each model fine-tuned on the train split (multiple_choice, as above),
beside the Quickstart shape fine-tuned from scratch.

Each run is train.py in a subprocess (out/experiments/NAME). Results go to
benchmarks/results/objectives_EXPERIMENT.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from architecture_experiments import CONFIG, OUT, ROOT, train  # also puts the project on sys.path

from gpt.checkpoint import load_model  # noqa: E402
from gpt.config import tomllib  # noqa: E402 (tomli before Python 3.11)
from gpt.dataset import TokenDataset  # noqa: E402
from gpt.downstream import evaluate_choices, read_choices  # noqa: E402
from gpt.evaluate import evaluate_tokens  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
MUON_CONFIG = ROOT / "configs" / "shakespeare_char.toml"  # the Quickstart since Muon; CONFIG is its AdamW recipe
TASKS = ROOT / "data" / "shakespeare" / "tasks"
BYTES = ["--data.dir=data/shakespeare/byte"]
LARGE = ["--model.n_layer=6", "--model.n_head=6", "--model.n_embd=192", "--model.block_size=256", "--optim.lr=2e-3",
         "--optim.min_lr=1e-4", "--run.max_iters=2000", "--eval.eval_interval=1000"]
FINE_TUNE = ["--run.max_iters=300", "--optim.lr=1e-3", "--optim.min_lr=1e-4", "--optim.warmup_iters=30",
             "--optim.weight_decay=0.01", "--model.dropout=0.1", "--eval.eval_interval=100", "--log.log_interval=50"]
SMS = ["--run.task=classify", "--classify.train_file=data/sms_spam/sms-spam.csv", "--classify.label_column=spam",
       "--classify.val_fraction=0.15", "--batch.batch_size=32", *FINE_TUNE]
CHOICE = ["--run.task=multiple_choice", f"--multiple_choice.train_file={TASKS / 'next_line_train.jsonl'}",
          f"--multiple_choice.val_file={TASKS / 'next_line_val.jsonl'}",
          f"--multiple_choice.test_file={TASKS / 'next_line_test.jsonl'}", "--batch.batch_size=16", *FINE_TUNE]


def run(name: str, overrides: list[str], reuse: bool, config=CONFIG) -> dict:
    """train.py NAME, or with reuse the finished run already in out/experiments/NAME."""
    metrics = OUT / name / "metrics.jsonl"
    if reuse and (OUT / name / "config.toml").exists() and metrics.exists():
        records = [json.loads(line) for line in metrics.read_text().splitlines()]
        planned = tomllib.loads((OUT / name / "config.toml").read_text())["run"]["max_iters"]
        if records and max(r["iter"] for r in records) == planned:  # finished, not stopped on the way
            print(f"== {name}: reused", flush=True)
            return {"name": name, "overrides": overrides, "reused": True, "records": records}
    result = train(name, overrides, None, config=config)
    result["records"] = [json.loads(line) for line in metrics.read_text().splitlines()]
    return result


def last(records: list[dict], key: str):
    return [r[key] for r in records if key in r][-1]


def best(records: list[dict], key: str):
    return max(r[key] for r in records if key in r)


def objectives(args) -> dict:
    val = TokenDataset(ROOT / "data" / "shakespeare" / "byte", "val").tokens
    rows = {}
    for objective in ("causal", "mlm", "prefix"):
        pre = run(f"objective_{objective}", [*BYTES, f"--lm.objective={objective}"], args.reuse)
        model, tok, ckpt = load_model(OUT / pre["name"] / "best.pt")
        row = {"own_val_loss": min(r["val_loss"] for r in pre["records"] if "val_loss" in r)}
        masked = tok if objective == "mlm" else None
        scored = evaluate_tokens(model, val, "val", 128, 128, byte_lengths=tok.byte_lengths(), progress=False, masked=masked)
        row["masked_loss" if masked else "next_byte_loss"] = scored.loss
        rows[objective] = row
    for init in ("scratch", "causal", "mlm", "prefix"):
        start = ["--classify.tokenizer=byte"] if init == "scratch" else [f"--run.init_from={OUT / f'objective_{init}'}"]
        sms = run(f"objective_sms_{init}", [*SMS, *start], args.reuse)
        start = ["--multiple_choice.tokenizer=byte"] if init == "scratch" else [start[0]]
        choice = run(f"objective_choice_{init}", [*CHOICE, *start], args.reuse)
        rows.setdefault(init, {}).update(sms_macro_f1=best(sms["records"], "macro_f1"),
                                         choice_test_accuracy=last(choice["records"], "test_accuracy"))
    sample = subprocess.run([sys.executable, "sample.py", f"--out_dir={OUT / 'objective_causal'}", "--max_new_tokens=300",
                             "--seed=1", "--prompt=\n", "--no-stream"], cwd=ROOT, capture_output=True, text=True)
    return {"rows": rows, "gpt_sample": sample.stdout}


def shots(args) -> dict:
    questions = read_choices(TASKS / "next_line_test.jsonl", "test")
    pool = read_choices(TASKS / "next_line_train.jsonl", "train")
    rows = {}
    for name, shape, config in (("quickstart", [], CONFIG), ("quickstart_muon", [], MUON_CONFIG), ("large", LARGE, CONFIG)):
        pre = run(f"shots_{name}", shape, args.reuse, config)
        model, tok, _ = load_model(OUT / pre["name"] / "best.pt")
        row = {"val_loss": min(r["val_loss"] for r in pre["records"] if "val_loss" in r),
               "params": sum(p.numel() for p in model.parameters())}
        for k in (0, 1, 3, 5):
            scored = evaluate_choices(model, tok, questions, "test", shots=k, shot_pool=pool, seed=0, progress=False)
            row[f"{k}_shot"] = {"acc": scored["acc"], "acc_norm": scored["acc_norm"]}
        blind = evaluate_choices(model, tok, [("\n", e, right) for _, e, right in questions], "test", progress=False)
        row["endings_only"] = {"acc": blind["acc"], "acc_norm": blind["acc_norm"]}
        shape_only = [o for o in shape if o.startswith("--model.")]
        tuned = run(f"shots_tuned_{name}", [*CHOICE, f"--run.init_from={OUT / pre['name']}", *shape_only], args.reuse)
        row["fine_tuned_test_accuracy"] = last(tuned["records"], "test_accuracy")
        # the baseline, fine-tuned with the same AdamW recipe as every row; the large shape from scratch
        # is left out (~20 min more)
        if name == "quickstart":
            scratch = run(f"shots_scratch_{name}", [*CHOICE, "--multiple_choice.tokenizer=char"], args.reuse)
            row["scratch_test_accuracy"] = last(scratch["records"], "test_accuracy")
        rows[name] = row
    return {"rows": rows}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("experiment", choices=["objectives", "shots"])
    p.add_argument("--reuse", action="store_true", help="keep runs already finished in out/experiments")
    args = p.parse_args()
    result = {"objectives": objectives, "shots": shots}[args.experiment](args)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"objectives_{args.experiment}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["rows"], indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
