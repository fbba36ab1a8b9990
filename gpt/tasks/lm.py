"""Language modelling: next-token prediction on a corpus prepared by gpt.prepare (run.task = "lm").

The data is data.dir's train.bin / val.bin, cut into windows of block_size + 1
tokens (gpt.dataset). A shipped corpus such as data/shakespeare/char is
prepared from its texts on first use. Evaluation reports the mean loss on a
fixed set of windows of each split (eval.eval_iters batches of batch.batch_size
windows, shared out among the processes: the same set on any number of them).

What is predicted is lm.objective (gpt/objectives.py): "causal" (GPT, the default),
"mlm" (BERT's masked LM: bidirectional attention, 15% of the tokens corrupted and
predicted; the mask token is added to the data's tokenizer) or "prefix" (the prefix
LM: a random split point per window, bidirectional before it, loss after it). The
loss reported is the objective's: next-token loss, masked-token loss, or next-token
loss on the suffixes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from gpt.dataset import TokenDataset, WindowSampler, eval_indices
from gpt.errors import UserError, require
from gpt.init import Start, initial_model, with_tokens
from gpt.model import GPT
from gpt.objectives import MASK, OBJECTIVES, objective_batch
from gpt.prepare import ensure_prepared
from gpt.system import Processes, barrier, to_device
from gpt.tokenizer import TOKENIZERS, base_spec, from_spec, with_added

EVAL_KEYS = 1 << 40  # evaluation windows draw their masks and split points from keys above the training stream's


@dataclass
class LMConfig:
    """The [lm] section of a config."""

    objective: str = "causal"  # causal (GPT) | mlm (BERT's masked LM) | prefix (prefix LM): gpt/objectives.py

    def __post_init__(self):
        require(self.objective in OBJECTIVES, "objective", f"one of {', '.join(OBJECTIVES)}", self.objective)


class LanguageModeling:
    Settings = LMConfig  # data, model and batch settings are the common sections
    best_metric, higher_is_better = "val_loss", False
    eval_splits, final_splits = ("train", "val"), ()

    def __init__(self, cfg, procs: Processes):  # cfg: the run's gpt.config.Config
        self.cfg, self.procs = cfg, procs
        data_dir = Path(cfg.data.dir)
        shipped = data_dir.name in TOKENIZERS and (data_dir.parent / "texts").is_dir()
        if shipped and not (data_dir / "meta.json").exists():  # e.g. data/shakespeare/char, on first use
            if procs.local_rank == 0:
                ensure_prepared(data_dir.parent, data_dir.name, val_fraction=cfg.data.val_fraction)
            barrier()
        self.data = {split: TokenDataset(data_dir, split) for split in ("train", "val")}
        self.objective = cfg.lm.objective
        self.added = [MASK] if self.objective == "mlm" else []
        self.tokenizer_spec = with_added(from_spec(self.data["train"].meta["tokenizer"]), self.added).spec()

    # ---- the model ---------------------------------------------------------------------------------

    def build_model(self, device) -> tuple[GPT, Start]:
        cfg = self.cfg
        start = initial_model(cfg, scratch_tokenizer=lambda: from_spec(self.tokenizer_spec), vocab_source=cfg.data.dir,
                              note=self.procs.note, device=device)
        if start.source != "scratch":  # weights trained on some tokens
            self._check_tokenizer(start)
            start = with_tokens(start, self.added)
        if self.objective != "causal":
            start.model.check_bidirectional()
        if self.objective == "prefix" and start.model.config.block_size < 2:
            raise UserError("lm.objective = 'prefix' splits each window in two: it needs block_size >= 2")
        self.tokenizer = start.tokenizer
        self.T, self.batch_size = start.model.config.block_size, cfg.batch.batch_size
        for data in self.data.values():
            data.check(self.T, self.tokenizer.text_vocab_size)
        p = self.procs
        self.sampler = WindowSampler(self.data["train"].num_windows(self.T), self.batch_size, seed=cfg.run.seed,
                                     rank=p.rank, world_size=p.world_size)
        self.eval_batches = {  # the same windows at every evaluation, so the figures compare
            split: eval_indices(data.num_windows(self.T), self.batch_size, cfg.eval.eval_iters, rank=p.rank,
                                world_size=p.world_size)
            for split, data in self.data.items()
        }
        return start.model, start

    def _check_tokenizer(self, start: Start) -> None:
        """Weights trained on other tokens than the data's would read it as noise."""
        theirs, ours = start.tokenizer, from_spec(self.tokenizer_spec)
        if base_spec(theirs.spec()) != base_spec(ours.spec()):
            raise UserError(f"{start.source} reads {theirs.name} tokens ({theirs.vocab_size} ids), but {self.cfg.data.dir} "
                            f"holds {ours.name} tokens ({ours.vocab_size} ids): use data prepared with the model's tokenizer")

    # ---- training ------------------------------------------------------------------------------------

    def grad_accum(self) -> int:
        batch = self.cfg.batch
        if not batch.tokens_per_step:
            return batch.grad_accum
        per_micro_step = batch.batch_size * self.T * self.procs.world_size
        if batch.tokens_per_step % per_micro_step:
            raise UserError(
                f"batch.tokens_per_step ({batch.tokens_per_step:,}) must be a multiple of batch_size x block_size x "
                f"processes = {batch.batch_size} x {self.T} x {self.procs.world_size} = {per_micro_step:,}: "
                f"change tokens_per_step, batch_size or the number of processes"
            )
        return batch.tokens_per_step // per_micro_step

    def describe_step(self, grad_accum: int) -> str:
        w = self.procs.world_size
        return (f"{self.batch_size * self.T * grad_accum * w:,} tokens per step "
                f"({self.batch_size} x {self.T} x {grad_accum} accumulation x {w})")

    def next_batch(self) -> tuple[torch.Tensor, ...]:
        keys = self.sampler.next_positions()  # the windows' places in the stream
        return self._batch("train", self.sampler.next_indices(), keys)

    def _batch(self, split: str, indices, keys) -> tuple[torch.Tensor, ...]:
        """The objective's (inputs, targets[, prefix]) for windows `indices` of a split."""
        x, y = self.data[split].batch(indices, self.T)
        windows = torch.cat([x, y[:, -1:]], dim=1)
        mask_id = self.tokenizer.added_id(MASK) if self.added else None
        return objective_batch(self.objective, windows, keys, seed=self.cfg.run.seed, mask_id=mask_id,
                               vocab_size=self.tokenizer.text_vocab_size)

    def loss(self, model, batch) -> torch.Tensor:
        return forward(model, batch)[1]

    # ---- evaluation ------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, model, split: str, device, each_batch: Callable) -> dict[str, torch.Tensor]:
        total, windows = torch.zeros((), device=device), 0
        for indices in self.eval_batches[split]:
            read = indices if len(indices) else [0]  # [0]: a stand-in, not counted
            batch = self._batch(split, read, EVAL_KEYS + np.asarray(read))
            with each_batch():
                total += forward(model, to_device(batch, device))[1].float() * len(indices)
            windows += len(indices)
        return {"loss": total, "windows": torch.tensor(float(windows), device=device)}

    def summarize(self, sums: dict[str, dict[str, torch.Tensor]]) -> tuple[dict, str]:
        metrics = {f"{split}_loss": (s["loss"] / s["windows"]).item() for split, s in sums.items()}
        return metrics, ", ".join(f"{split} loss {metrics[f'{split}_loss']:.4f}" for split in sums)

    # ---- checkpoints -----------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)

    def checkpoint_info(self) -> dict:
        return {"tokenizer": self.tokenizer.spec(), "objective": self.objective}


def forward(model, batch: tuple[torch.Tensor, ...]):
    """model(inputs, targets[, prefix=...]): the batch objective_batch made."""
    return model(*batch[:2], prefix=batch[2]) if len(batch) > 2 else model(*batch)
