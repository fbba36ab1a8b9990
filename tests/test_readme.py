"""The README's commands work as written, in order, on a fresh copy (tests/readme_walk.py)."""

import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_every_readme_command_runs_in_order():
    walk = subprocess.run([sys.executable, str(ROOT / "tests" / "readme_walk.py"), "--fast"], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert walk.returncode == 0, walk.stdout + walk.stderr
    assert walk.stdout.count("\nok ") >= 12  # the commands that need no GPU, network or corpus of one's own ran


def test_the_walk_reads_the_readme_as_written():
    sys.path.insert(0, str(ROOT / "tests"))
    from readme_walk import readme_commands, shrink

    commands = readme_commands(ROOT / "README.md")
    first, _ = commands[0]
    assert first.startswith("pip install -e . && python train.py configs/shakespeare_char.toml")
    assert shrink(first) == "python train.py configs/shakespeare_char.toml --max_iters=40"
    skipped = [c for c, needs in commands if needs]
    assert any("torchrun" in c for c in skipped) and any("init_from=gpt2" in c for c in skipped)
    assert shrink("python train.py c.toml --resume --max_iters=2000   # longer") == "python train.py c.toml --resume --max_iters=80"
