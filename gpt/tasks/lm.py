"""Language modelling: next-token prediction on a corpus prepared by gpt.prepare (run.task = "lm").

The data is data.dir's train.bin / val.bin, cut into windows of block_size + 1
tokens (gpt.dataset). A shipped corpus such as data/shakespeare/char is
prepared from its texts on first use. Evaluation reports the mean loss on a
fixed set of windows of each split (eval.eval_iters batches of batch.batch_size
windows, shared out among the processes: the same set on any number of them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from gpt.dataset import TokenDataset, WindowSampler, eval_indices
from gpt.errors import UserError
from gpt.init import Start, initial_model
from gpt.model import GPT
from gpt.prepare import ensure_prepared
from gpt.system import Processes, barrier, to_device
from gpt.tokenizer import TOKENIZERS, from_spec


class LanguageModeling:
    Settings = None  # data, model and batch settings are the common sections
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
        self.tokenizer_spec = self.data["train"].meta["tokenizer"]

    # ---- the model ---------------------------------------------------------------------------------

    def build_model(self, device) -> tuple[GPT, Start]:
        cfg = self.cfg
        start = initial_model(cfg, scratch_tokenizer=lambda: from_spec(self.tokenizer_spec), vocab_source=cfg.data.dir,
                              note=self.procs.note, device=device)
        if start.source != "scratch":  # weights trained on some tokens
            self._check_tokenizer(start)
        self.T, self.batch_size = start.model.config.block_size, cfg.batch.batch_size
        for data in self.data.values():
            data.check(self.T, start.model.config.vocab_size)
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
        if theirs.spec() != ours.spec():
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
        return self.data["train"].batch(self.sampler.next_indices(), self.T)

    def loss(self, model, batch) -> torch.Tensor:
        return model(*batch)[1]

    # ---- evaluation ------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, model, split: str, device, each_batch: Callable) -> dict[str, torch.Tensor]:
        total, windows = torch.zeros((), device=device), 0
        for indices in self.eval_batches[split]:
            batch = self.data[split].batch(indices if len(indices) else [0], self.T)  # [0]: a stand-in, not counted
            with each_batch():
                total += model(*to_device(batch, device))[1].float() * len(indices)
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
        return {"tokenizer": self.tokenizer_spec}
