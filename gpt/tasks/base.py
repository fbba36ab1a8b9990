"""What a task is: the interface between the Trainer and what is learned from which data.

A task owns its data, builds the network it trains (through gpt.init, from
run.init_from), hands out micro-batches, computes the loss, and evaluates. The
Trainer owns everything else: processes, precision, the optimiser, checkpoints,
logging, signals, and the final evaluation with the best checkpoint. A task
never touches the Trainer; the Trainer only uses what is declared here.

To add a task: write gpt/tasks/NAME.py with a class that has these members
(it need not inherit from Task: the Protocol is structural), and add it to
the registry in gpt/tasks/__init__.py. If it has settings of its own, give the
class a `Settings` dataclass: config.py adds it as the [NAME] section.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, ClassVar, Protocol

if TYPE_CHECKING:  # annotations only
    import torch
    import torch.nn as nn

    from gpt.init import Start
    from gpt.system import Processes


class Task(Protocol):
    Settings: ClassVar[type | None]  # the dataclass of the task's own [section], or None
    best_metric: str  # the metric (a key of summarize's metrics) that chooses best.pt
    higher_is_better: bool
    eval_splits: tuple[str, ...]  # evaluated every eval.eval_interval iterations
    final_splits: tuple[str, ...]  # evaluated once at the end, with best.pt's weights

    def __init__(self, cfg, procs: Processes) -> None:
        """Read and check the data (every task takes the same arguments). cfg is the run's
        gpt.config.Config (not imported here: config.py sits above the tasks, reading their
        Settings), so a task reads its settings as cfg.SECTION.KEY."""

    def build_model(self, device: torch.device) -> tuple[nn.Module, Start]:
        """The network to train on `device`, built (on the CPU) from run.init_from, and where it
        came from (Start: the checkpoint to resume, if any). Afterwards the data is ready for
        its block_size."""

    def grad_accum(self) -> int:
        """Micro-batches per optimiser step in each process."""

    def describe_step(self, grad_accum: int) -> str:
        """What one optimiser step consumes, e.g. "49,152 tokens per step (12 x 1024 x 4 x 1)"."""

    def next_batch(self) -> tuple[torch.Tensor, ...]:
        """This process's next training micro-batch (CPU tensors)."""

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The mean loss of a micro-batch on the device."""

    def evaluate(self, model: nn.Module, split: str, device: torch.device,
                 each_batch: Callable) -> dict[str, torch.Tensor]:
        """Sums over this process's share of `split` (the Trainer adds up all processes).
        Run each batch's forward inside `with each_batch():`: it applies mixed precision, and
        it is where a stop request (Ctrl-C, SIGTERM) ends the evaluation."""

    def summarize(self, sums: dict[str, dict[str, torch.Tensor]]) -> tuple[dict, str]:
        """{split: sums} of all processes -> (metrics for metrics.jsonl, a line to print)."""

    def state_dict(self) -> dict:
        """The task's resumable state (its data sampler's position), saved in every checkpoint."""

    def load_state_dict(self, state: dict) -> None: ...

    def checkpoint_info(self) -> dict:
        """Fixed facts every checkpoint carries (the tokenizer spec, label names, ...)."""
