"""Train a GPT.

    python train.py CONFIG.toml [--key=value ...] [--resume]
    torchrun --nproc_per_node=8 train.py CONFIG.toml [--key=value ...]

CONFIG.toml: see configs/ and gpt/config.py for every key. Overrides are
--section.key=value or --key=value (e.g. --optim.lr=1e-3 --max_iters=2000).
--resume continues the run in run.out_dir from its ckpt.pt exactly (also
without CONFIG.toml: the run's own config.toml is used).
"""

import sys
from pathlib import Path

from gpt.config import load_config
from gpt.errors import UserError, exit_on_user_error
from gpt.trainer import Trainer, TrainingDiverged


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(__doc__.strip())
        return
    path = args.pop(0) if not args[0].startswith("--") else None
    if "--resume" in args:
        args = [a for a in args if a != "--resume"] + ["--run.init_from=resume"]
        if path is None:  # resume from the run's own resolved config
            path = Path(load_config(None, args).run.out_dir) / "config.toml"
            if not path.exists():
                raise UserError(f"nothing to resume: {path} does not exist; pass the config file too")
    cfg = load_config(path, args)
    try:
        Trainer(cfg).train()
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
