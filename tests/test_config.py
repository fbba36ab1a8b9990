"""Training configs: TOML files, --key=value overrides, and the errors they give."""

import subprocess
import sys

import pytest

from gpt.config import Config, load_config, save_config
from gpt.errors import UserError

from conftest import ROOT


def write(tmp_path, text):
    path = tmp_path / "cfg.toml"
    path.write_text(text)
    return path


def test_file_then_overrides(tmp_path):
    path = write(tmp_path, '[run]\nmax_iters = 100\nout_dir = "out/x"\n[model]\nn_layer = 3\n[optim]\nlr = 1e-3\n')
    cfg = load_config(path, ["--optim.lr=2e-3", "--max_iters=7", "--system.compile=false", "--run.out_dir=2024"])
    assert cfg.optim.lr == 2e-3 and cfg.run.max_iters == 7 and cfg.model.n_layer == 3
    assert cfg.system.compile is False and cfg.run.out_dir == "2024"  # a str field keeps "2024" as text
    assert cfg.optim.min_lr == Config().optim.min_lr  # untouched keys keep their defaults
    assert {"run.max_iters", "optim.lr", "model.n_layer", "system.compile"} <= cfg.explicit
    assert "optim.min_lr" not in cfg.explicit


def test_an_integer_is_fine_for_a_float():
    assert load_config(None, ["--optim.lr=1"]).optim.lr == 1.0


def test_resolved_config_round_trips_through_toml(tmp_path):
    cfg = load_config(None, ["--optim.lr=3e-4", '--run.out_dir=out/"quoted" dir', "--model.dropout=0.1",
                             "--system.compile=auto"])
    save_config(cfg, tmp_path / "config.toml")
    again = load_config(tmp_path / "config.toml")
    assert again.to_dict() == cfg.to_dict()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--optim.lrr=1"], "unknown config key 'optim.lrr': did you mean 'optim.lr'?"),
        (["--max_iter=5"], "unknown config key 'max_iter': did you mean 'run.max_iters'?"),
        (["--optim.lr=abc"], "optim.lr must be a number, got 'abc' (str)"),
        (["--batch.batch_size=1.5"], "batch.batch_size must be an integer, got 1.5 (float)"),
        (["--log.wandb=1"], "log.wandb must be a boolean, got 1 (int)"),
        (["--batch.batch_size=0"], "batch.batch_size must be a positive integer, got 0"),
        (["--model.n_layer=-2"], "model.n_layer must be a positive integer, got -2"),
        (["--model.n_embd=100", "--model.n_head=3"], "model.n_embd (100) must be divisible by n_head (3)"),
        (["--optim.schedule=linear"], "optim.schedule must be one of cosine, constant, wsd, got 'linear'"),
        (["--optim.min_lr=1", "--optim.lr=0.1"], "optim.min_lr must be in [0, lr = 0.1], got 1.0"),
        (["--system.dtype=fp8"], "system.dtype must be one of auto, float32, bfloat16, float16, got 'fp8'"),
        (["--optim.lr=nan"], "optim.lr must be a finite number, got nan"),
        (["max_iters=5"], "write overrides as --key=value"),
    ],
)
def test_bad_keys_and_values_are_named(overrides, message):
    with pytest.raises(UserError) as e:
        load_config(None, overrides)
    assert message in str(e.value)


def test_errors_in_the_file(tmp_path):
    with pytest.raises(UserError, match=r"unknown section \[optimizer\]: did you mean \[optim\]\?"):
        load_config(write(tmp_path, "[optimizer]\nlr = 1\n"))
    with pytest.raises(UserError, match="unknown config key 'run.max_itres': did you mean 'run.max_iters'"):
        load_config(write(tmp_path, "[run]\nmax_itres = 1\n"))
    with pytest.raises(UserError, match="is not valid TOML"):
        load_config(write(tmp_path, "[run\n"))
    with pytest.raises(UserError, match="config file .*nope.toml does not exist"):
        load_config(tmp_path / "nope.toml")


def test_train_py_reports_a_bad_key_in_one_line_with_exit_2():
    run = subprocess.run([sys.executable, "train.py", "configs/shakespeare_char.toml", "--optim.warmup_iter=1"],
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr == "error: unknown config key 'optim.warmup_iter': did you mean 'optim.warmup_iters'?\n"


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.run.out_dir.startswith("out/") and cfg.run.max_iters > 0
