"""Train a GPT.

    python train.py CONFIG.toml [--key=value ...]            # a new run in run.out_dir
    python train.py CONFIG.toml --resume [--max_iters=N]     # continue that run exactly
    python train.py --resume --run.out_dir=DIR               # the same, from the run's own config.toml
    python train.py CONFIG.toml --overwrite                  # a new run where an old one was
    torchrun --nproc_per_node=8 train.py CONFIG.toml [--key=value ...]

CONFIG.toml: see configs/ and gpt/config.py for every key. Overrides are
--section.key=value or --key=value (e.g. --optim.lr=1e-3 --max_iters=2000).

--resume continues the run in run.out_dir from its latest checkpoint, with the
run's own config.toml: overrides may extend run.max_iters or change logging,
evaluation and the device, but not what the run learns (lr, schedule, batch,
model, data). A new run refuses an out_dir that holds checkpoints unless
--overwrite is given; the old checkpoints are removed only once the new run
has started.
"""

import difflib
import sys

from gpt.config import load_config, resume_config
from gpt.errors import UserError, exit_on_user_error
from gpt.system import exit_worker
from gpt.trainer import Trainer, TrainingDiverged

FLAGS = ("--resume", "--overwrite")


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(__doc__.strip())
        return
    path = args.pop(0) if not args[0].startswith("--") else None
    resume, overwrite = "--resume" in args, "--overwrite" in args
    args = [a for a in args if a not in FLAGS]
    for arg in args:  # a misspelt flag (--resum) would otherwise read as a config override
        if arg.startswith("--") and "=" not in arg:
            close = difflib.get_close_matches(arg, FLAGS, n=1)
            raise UserError(f"unknown flag {arg}" + (f": did you mean {close[0]}?" if close else
                                                     ": overrides are --key=value; the flags are --resume, --overwrite"))
    if resume and overwrite:
        raise UserError("--resume continues a run and --overwrite replaces it: give one of them")
    if resume or load_config(path, args).run.init_from == "resume":
        cfg, notes = resume_config(path, [a for a in args if not a.startswith("--run.init_from=")])
    else:
        cfg, notes = load_config(path, args), []
    try:
        trainer = Trainer(cfg, overwrite=overwrite)
        if notes and trainer.procs.is_main:  # once set up: a failed start prints its error alone
            print("\n".join(notes))
        trainer.train()
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
    exit_worker()  # under torchrun: no interpreter shutdown to abort in (gpt/system.py)
