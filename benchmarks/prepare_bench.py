"""gpt.prepare's throughput against raw tiktoken, and its peak memory.

    python benchmarks/prepare_bench.py --size_mb 100 --workers 2             # throughput ratio
    python benchmarks/prepare_bench.py --size_mb 2048 --workers 2 --no_baseline   # peak RSS on 2 GB

Makes a corpus of --size_mb MB from the shipped Shakespeare texts (5 MB files,
each a document), then times:
  - baselines: tiktoken's GPT-2 `encode_ordinary_batch(texts, num_threads=W)` on the
    same text, already in memory (no reading, no writing), and the same call in W
    already-started processes, each on its share of the files;
  - prepare: `python -m gpt.prepare DIR --tokenizer=gpt2 --workers=W`, a separate
    process, end to end (start-up, reading, tokenizing, writing), with the peak
    resident memory of its whole process tree sampled every 50 ms.
Prints one JSON line per figure.
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_corpus(directory: Path, size_mb: int) -> list[Path]:
    volume = "".join(lzma.open(p, "rt").read() for p in sorted((ROOT / "data/shakespeare/texts").glob("*.xz")))
    paths = []
    while len(paths) * len(volume) < size_mb * 1e6:
        path = directory / f"volume{len(paths):04d}.txt"
        path.write_text(f"copy {len(paths)}\n" + volume)
        paths.append(path)
    return paths


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of a process and all its descendants (Linux /proc)."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                total += next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    stack += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError, StopIteration):
            pass
    return total


def run_prepare(corpus: Path, out: Path, workers: int) -> tuple[float, int]:
    cmd = [sys.executable, "-m", "gpt.prepare", str(corpus), f"--out={out}", "--tokenizer=gpt2",
           f"--workers={workers}", "--val_fraction=0.01", "--overwrite"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_rss_bytes(proc.pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    stdout, stderr = proc.communicate()
    seconds = time.perf_counter() - t0
    sampler.join()
    if proc.returncode:
        raise SystemExit(f"prepare failed: {stderr}")
    print(stdout.strip(), file=sys.stderr)
    return seconds, peak[0]


_enc = None


def _load_encoding():
    global _enc
    from gpt.tokenizer import get_tokenizer

    _enc = get_tokenizer("gpt2").enc


def _encode_file(path: Path) -> int:
    return sum(map(len, _enc.encode_ordinary_batch([path.read_text()], num_threads=1)))


def time_processes(paths: list[Path], workers: int) -> float:
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(workers, initializer=_load_encoding) as pool:
        pool.map(abs, range(workers))  # wait until every worker is up
        t0 = time.perf_counter()
        pool.map(_encode_file, paths, chunksize=1)
        return time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size_mb", type=int, default=100)
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--no_baseline", action="store_true", help="skip the in-memory tiktoken baseline")
    p.add_argument("--repeats", type=int, default=1, help="time each side this many times, report medians")
    args = p.parse_args()

    from gpt.tokenizer import get_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus"
        corpus.mkdir()
        paths = make_corpus(corpus, args.size_mb)
        n_bytes = sum(path.stat().st_size for path in paths)
        common = {"bench": "prepare", "input_mb": round(n_bytes / 1e6, 1), "files": len(paths), "workers": args.workers}

        prepare_s = []
        for _ in range(args.repeats):
            seconds, peak = run_prepare(corpus, Path(tmp) / "out", args.workers)
            prepare_s.append(seconds)
            print(json.dumps({**common, "what": "gpt.prepare end to end", "seconds": round(seconds, 2),
                              "mb_per_s": round(n_bytes / 1e6 / seconds, 2), "peak_tree_rss_mb": round(peak / 1e6)}))
        if args.no_baseline:
            return
        enc = get_tokenizer("gpt2").enc
        texts = [path.read_text() for path in paths]
        baseline_s = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            n_tokens = sum(map(len, enc.encode_ordinary_batch(texts, num_threads=args.workers)))
            baseline_s.append(time.perf_counter() - t0)
            print(json.dumps({**common, "what": f"tiktoken encode_ordinary_batch, num_threads={args.workers}, in memory",
                              "seconds": round(baseline_s[-1], 2), "mb_per_s": round(n_bytes / 1e6 / baseline_s[-1], 2),
                              "tokens": n_tokens}))
        del texts
        process_s = []
        for _ in range(args.repeats):
            process_s.append(time_processes(paths, args.workers))
            print(json.dumps({**common, "what": f"tiktoken encode_ordinary_batch in {args.workers} started processes",
                              "seconds": round(process_s[-1], 2), "mb_per_s": round(n_bytes / 1e6 / process_s[-1], 2)}))
        med = {k: sorted(v)[len(v) // 2] for k, v in dict(prepare=prepare_s, threads=baseline_s, processes=process_s).items()}
        print(json.dumps({**common, "prepare_over_tiktoken_threads": round(med["threads"] / med["prepare"], 2),
                          "prepare_over_tiktoken_processes": round(med["processes"] / med["prepare"], 2)}))


if __name__ == "__main__":
    main()
