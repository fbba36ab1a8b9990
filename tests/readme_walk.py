"""Run every command of README.md in order, as a new user would after the Quickstart, in a
fresh copy of the project, with iteration counts shrunk so the walk takes minutes on a CPU.

    python tests/readme_walk.py            # every command
    python tests/readme_walk.py --fast     # without the GPT-2-BPE Shakespeare model (CI: about 80 s)

What is skipped, and why: `pip install` steps (the environment running this has the
package and its dev extras), the test command (this walk runs inside it), and every
command under a comment that starts with "# needs" (the README says there what it needs:
GPUs, the network, a corpus of your own). Shrunk: train.py's --max_iters (divided by 25;
40 where a new run gives none) and sample.py's --max_new_tokens (50). Everything else
runs as written, in bash, in the order of the README; the walk stops at the first command
that fails and prints its output.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SLOW = ("configs/shakespeare_gpt2.toml",)  # a GPT-2-vocabulary model: ~100 s even shrunk, on 2 CPU cores


def readme_commands(readme: Path) -> list[tuple[str, str | None]]:
    """(command line, why it is skipped or None) for each line of the README's bash blocks, in
    order; a comment "# needs ..." covers the lines after it, to the next comment or block end."""
    commands, in_bash, needs = [], False, None
    for line in readme.read_text().splitlines():
        if line.startswith("```"):
            in_bash, needs = line.strip() == "```bash", None
            continue
        if not in_bash or not line.strip():
            continue
        if line.lstrip().startswith("#"):
            needs = line.strip() if line.lstrip().startswith("# needs") else None
            continue
        commands.append((line, needs))
    return commands


def shrink(command: str) -> str | None:
    """The command as the walk runs it (None: skipped)."""
    command = re.sub(r"\s+#\s.*$", "", command)  # the trailing comment
    command = re.sub(r"^pip install [^&]*&&\s*", "", command)
    if command.startswith("pip install") or "pytest" in command:
        return None
    if "train.py" in command:
        if "--max_iters=" in command:
            command = re.sub(r"--max_iters=(\d+)", lambda m: f"--max_iters={int(m.group(1)) // 25}", command)
        elif "--resume" not in command:
            command += " --max_iters=40"
    if "sample.py" in command:
        command += " --max_new_tokens=50"
    return command


def fresh_copy(destination: Path) -> Path:
    """The project's files as a fresh clone has them (tracked, and new files git does not ignore)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, destination / name)
    return destination


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fast", action="store_true", help=f"skip the slow commands ({', '.join(SLOW)})")
    p.add_argument("--keep", action="store_true", help="keep the copy (its path is printed)")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="readme-walk-"))
    project = fresh_copy(work / "project")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(project)}
    try:
        for command, needs in readme_commands(ROOT / "README.md"):
            run = shrink(command)
            if needs or run is None or (args.fast and any(s in run for s in SLOW)):
                print(f"skip  {command}" + (f"   ({needs.lstrip('# ')})" if needs else ""), flush=True)
                continue
            t0 = time.perf_counter()
            result = subprocess.run(["bash", "-c", run], cwd=project, env=env, capture_output=True, text=True)
            print(f"{'ok' if result.returncode == 0 else 'FAIL':5} {run}   ({time.perf_counter() - t0:.0f} s)", flush=True)
            if result.returncode != 0:
                print(result.stdout[-3000:], result.stderr[-3000:], sep="\n", file=sys.stderr)
                return 1
        return 0
    finally:
        if args.keep:
            print(f"kept {project}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
