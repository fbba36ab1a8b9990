"""The training loop: one process, or one of many under torchrun (DDP), for any task.

    trainer = Trainer(load_config("configs/shakespeare_char.toml"))
    trainer.train()

Read it top to bottom: the learning rate schedule and the optimiser, the loop's
own state (TrainState), then the Trainer. Its __init__ runs in named stages:
where to run (device, precision, processes), the task and its data (gpt/tasks),
the model (from run.init_from, through the task), the optimiser, the state of
a resumed run, the model that runs (compiled, DDP), and the outputs (config.toml,
metrics.jsonl, wandb). train() runs the loop: evaluate and checkpoint every
eval_interval, one optimiser step per iteration (gradient accumulation inside),
a log line every log_interval, and at the end the task's final evaluation with
the best checkpoint.

Exactness: everything that decides what happens next (weights, optimiser and
grad-scaler state, the task's data position, every random generator, the loop
state) is in the checkpoint, so a resumed run continues exactly; on CPU its
losses and weights are bit-identical to an uninterrupted run's.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from gpt.atomic import DirectoryLock, atomic_path
from gpt.checkpoint import (BEST, load_checkpoint, previous_checkpoints, read_shards, rng_state, save_checkpoint,
                            set_rng_state, shard_dir, write_shards)
from gpt.config import Config, save_config
from gpt.errors import UserError
from gpt.optim import lr_at, make_optimizers, set_lr
from gpt.parallel import (clip_grad_norm, gradient_sync, is_sharded, load_model_state, load_optimizer_state, optimizer_state,
                          load_sharded_state, parallelize, sharded_state, stepped)
from gpt.system import (all_reduce_sum, autocast, barrier, finish_processes, pick_device, pick_dtype, start_processes,
                        to_device)
from gpt.tasks import TASKS
from gpt.tasks.base import Task


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf: the run stops (train.py exits with status 1)."""


class _Stopped(Exception):
    """A stop was requested in the middle of an evaluation: it is dropped, the run saves."""


# ---- the loop's state -------------------------------------------------------------------------


@dataclass
class TrainState:
    """Where the loop is; saved in every checkpoint (flat keys: see gpt/checkpoint.py)."""

    iter: int = 0  # optimiser steps completed
    best: float | None = None  # the best value of best_metric so far
    best_metric: str = "val_loss"  # the task's metric that chooses best.pt
    evals_since_best: int = 0  # evaluations without a better best (early stopping)
    wandb_id: str | None = None  # the Weights & Biases run continued on resume

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        """Restore; a best chosen by another metric (the task's setting changed) starts over."""
        metric, defaults = self.best_metric, TrainState()
        for name in ("iter", "best", "best_metric", "evals_since_best", "wandb_id"):
            setattr(self, name, state.get(name, getattr(defaults, name)))
        if self.best_metric != metric:
            self.best_metric, self.best, self.evals_since_best = metric, None, 0

    def improves(self, value: float, higher_is_better: bool) -> bool:
        """Record an evaluation's value of best_metric; True if it is the best so far."""
        # NaN (a diverged evaluation, e.g. the correlation of NaN predictions) is never the best
        better = not math.isnan(value) and (self.best is None or (value > self.best if higher_is_better
                                                                   else value < self.best))
        self.best = value if better else self.best
        self.evals_since_best = 0 if better else self.evals_since_best + 1
        return better


# ---- the trainer ----------------------------------------------------------------------------


class Trainer:
    def __init__(self, cfg: Config, overwrite: bool = False):
        """overwrite: a new run may start in an out_dir that holds another run's checkpoints
        (they are removed once this run has set up); without it, that is refused."""
        self.lock, self.created_out_dir = None, False
        try:
            self._start_system(cfg, overwrite)
            self.task: Task = TASKS[cfg.run.task](cfg, self.procs)  # the data, read and checked
            checkpoint = self._build_model(cfg)
            if checkpoint is not None and "model" in checkpoint:  # whole tensors, before FSDP shards them
                self.model.load_state_dict(checkpoint["model"])
            self._wrap_model()
            self._build_optimizers()  # on the parameters that train (FSDP's shards)
            if checkpoint is not None:
                self._restore(checkpoint)
            self._start_outputs(resumed=checkpoint is not None)
        except BaseException:
            self._abandon()
            raise

    # ---- setup stages, in order ------------------------------------------------------------------

    def _start_system(self, cfg: Config, overwrite: bool) -> None:
        """Where to run: device, processes, precision; and a writable out_dir that holds no
        other run (unless overwrite)."""
        self.cfg = cfg
        self.device = pick_device(cfg.system.device, "system.device")
        self.procs = start_processes(self.device)
        self.dtype = pick_dtype(cfg.system.dtype, self.device)
        if self.device.type == "cuda":
            torch.set_float32_matmul_precision("high")  # TF32 matmuls
        self.out_dir = Path(cfg.run.out_dir)
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise UserError(f"run.out_dir {self.out_dir} is a file: name a directory for the run")
        try:
            try:
                self.out_dir.mkdir(parents=True)
                self.created_out_dir = self.procs.is_main  # this run made it (a failed start removes it)
            except FileExistsError:
                pass
            probe = self.out_dir / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise UserError(f"run.out_dir {self.out_dir} cannot be written ({e.strerror}): choose another directory") from None
        if self.procs.is_main:
            self.lock = DirectoryLock(self.out_dir)  # one run at a time writes here
            for stale in self.out_dir.glob(".*.tmp-*"):  # from a run killed while writing
                _remove(stale)
        previous = previous_checkpoints(self.out_dir)
        if previous and cfg.run.init_from != "resume" and not overwrite:
            raise UserError(f"run.out_dir {self.out_dir} holds another run ({', '.join(p.name for p in previous[:3])}"
                            f"{' ...' if len(previous) > 3 else ''}): continue it with --resume, start again there "
                            f"with --overwrite, or choose another run.out_dir")

    def _build_model(self, cfg: Config) -> dict | None:
        """The task's network from run.init_from, on the device; returns the checkpoint to resume."""
        torch.manual_seed(cfg.run.seed)  # the same initial weights in every process
        model, start = self.task.build_model(self.device)
        self.model = model.to(self.device)  # the network: what is saved, loaded and measured
        self.cfg = dataclasses.replace(self.cfg, model=model.config)  # the resolved architecture
        self.checkpoint_path = Path(start.source)
        if start.checkpoint is not None:  # config.toml keeps the run's original init_from
            run = dataclasses.replace(self.cfg.run, init_from=start.checkpoint["config"]["run"]["init_from"])
            self.cfg = dataclasses.replace(self.cfg, run=run)
        self.grad_accum = self.task.grad_accum()
        if start.checkpoint is not None:
            self.grad_accum = self._resumed_grad_accum(start.checkpoint)
        return start.checkpoint

    def _resumed_grad_accum(self, ckpt: dict) -> int:
        """A resumed run keeps its global batch on any number of processes: the micro-batches
        per optimiser step over all processes (recorded in the checkpoint; in older ones, the
        accumulation times the processes that wrote it) are shared out again."""
        steps = ckpt.get("micro_batches_per_step")
        if steps is None and not self.cfg.batch.tokens_per_step:  # before it was recorded
            steps = ckpt["config"]["batch"]["grad_accum"] * len(ckpt["rng"])
        world = self.procs.world_size
        if steps is None or steps == self.grad_accum * world:
            return self.grad_accum
        if steps % world:
            raise UserError(f"the run takes {steps} micro-batches of {self.cfg.batch.batch_size} per optimiser step, which "
                            f"{world} processes cannot share evenly (a resumed run keeps its global batch): resume on "
                            f"a number of processes that divides {steps}")
        self.procs.note(f"note: {world} process(es) now share the run's {steps} micro-batches per step: "
                        f"{steps // world} accumulation steps each (the global batch is unchanged)")
        return steps // world

    def _build_optimizers(self) -> None:
        cfg = self.cfg
        self.optimizers = make_optimizers(self.model, cfg.optim, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.state = TrainState(best_metric=self.task.best_metric)
        self.resumed_before_eval = False
        torch.manual_seed(cfg.run.seed + self.procs.rank)  # dropout differs between processes

    def _restore(self, ckpt: dict) -> None:
        """A resumed run: optimiser (and a sharded checkpoint's weights), scaler, the task's data
        position, the loop, the RNGs."""
        if "shards" in ckpt:
            self._read_shards(ckpt, self.checkpoint_path, self.optimizers if ckpt.get("shards_hold_optimizer", True)
                              else None)
        else:
            load_optimizer_state(self.model, self.optimizers, ckpt["optimizer"])
        if ckpt["scaler"] and self.scaler.is_enabled():  # empty when written without fp16
            self.scaler.load_state_dict(ckpt["scaler"])
        self.task.load_state_dict(ckpt["sampler"])
        self.state.load_state_dict(ckpt)
        self.resumed_before_eval = ckpt.get("metrics") is None  # stopped by a signal, not at an evaluation
        rngs = ckpt["rng"]
        if len(rngs) == self.procs.world_size:
            set_rng_state(rngs[self.procs.rank])
        elif self.procs.is_main:
            print(f"note: the checkpoint was written by {len(rngs)} process(es), this run has "
                  f"{self.procs.world_size}: random generators start afresh (data order is unchanged)")

    def _read_shards(self, ckpt: dict, path: Path, optimizers=None) -> None:
        """A sharded checkpoint's weights (and optimizer state) into what this process holds,
        however many processes wrote them."""
        state = sharded_state(self.model, optimizers)
        read_shards(state, shard_dir(path, ckpt))
        load_sharded_state(self.model, optimizers, state)

    def _wrap_model(self) -> None:
        """The models that run (gpt/parallel.py): for training steps, wrapped for DDP or sharded by
        FSDP; for evaluation, the same without DDP's wrapper. Compiled as system.compile says."""
        self.train_model = parallelize(self.model, self.procs, self.device, self.cfg.system, self.dtype)
        self.compiled = self.train_model.module if isinstance(self.train_model, DDP) else self.train_model

    def _start_outputs(self, resumed: bool) -> None:
        """Once everything is set up: start wandb, write config.toml, forget metrics past the
        resumed checkpoint; a new run in a used out_dir (--overwrite) starts a fresh metrics.jsonl,
        and the old checkpoints go when the new run writes its first one (see save)."""
        self.resumed, self.start_iter = resumed, self.state.iter
        max_iters = self.cfg.run.max_iters
        if resumed and self.state.iter > max_iters:
            raise UserError(f"the run is at iteration {self.state.iter}, beyond run.max_iters = {max_iters}: "
                            f"give --max_iters above {self.state.iter} to train on")
        self.finished = resumed and self.state.iter == max_iters and not self.resumed_before_eval
        self.metrics = self.out_dir / "metrics.jsonl"
        self.wandb = None
        self.stop_requested, self.tokens_since_log, self.phase = False, 0, "training"
        if not self.procs.is_main or self.finished:  # a finished run is left exactly as it is
            return
        self._start_wandb()  # the last thing that can fail: before anything is changed
        if not resumed:
            self._clear_previous_run()
        save_config(self.cfg, self.out_dir / "config.toml")
        self._trim_metrics()

    def _clear_previous_run(self) -> None:
        """A new run (--overwrite) in a used out_dir, now that it has set up: the old run's
        checkpoints and metrics go together, so the directory never holds half of each."""
        previous = previous_checkpoints(self.out_dir)
        for path in previous:
            _remove(path)
        self.metrics.unlink(missing_ok=True)
        if previous:
            print(f"note: a new run in {self.out_dir}: the previous run's {len(previous)} checkpoint file(s) "
                  f"are replaced")

    def _trim_metrics(self) -> None:
        """On resume, forget records written after the checkpoint (they are about to be redone),
        and a torn last line (a run killed, or a full disk, in the middle of writing it)."""
        if not self.metrics.exists():
            return
        kept, torn = [], 0
        for line in self.metrics.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                torn += 1
                continue
            if record.get("iter", 0) <= self.start_iter:
                kept.append(line)
        if torn:
            print(f"note: dropped {torn} damaged line(s) of {self.metrics}")
        with atomic_path(self.metrics) as tmp:
            tmp.write_text("".join(line + "\n" for line in kept))

    def _start_wandb(self) -> None:
        if not self.cfg.log.wandb:
            return
        try:
            import wandb
        except ImportError:
            raise UserError("log.wandb = true but wandb is not installed: pip install 'gpt[wandb]', "
                            "or set log.wandb = false") from None
        try:
            self.wandb = wandb.init(project=self.cfg.log.wandb_project, config=self.cfg.to_dict(),
                                    name=self.cfg.log.wandb_run_name or self.out_dir.name, dir=str(self.out_dir),
                                    id=self.state.wandb_id, resume="allow")
        except Exception as e:  # not logged in, no network, a bad project name: all the user's to fix
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"wandb could not start ({reason}): run `wandb login`, set WANDB_MODE=offline, "
                            f"or set log.wandb = false") from None
        self.state.wandb_id = self.wandb.id

    # ---- the loop ------------------------------------------------------------------------------

    def train(self) -> None:
        cfg = self.cfg
        if self.procs.is_main:
            trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
            print(f"training {trainable / 1e6:.2f}M parameters on {self.device} ({str(self.dtype)[6:]}), "
                  f"{self.procs.world_size} process(es), {self.task.describe_step(self.grad_accum)}, "
                  f"iterations {self.state.iter} -> {cfg.run.max_iters}" + _engine(cfg.system, self.procs.world_size))
        handlers = {s: signal.signal(s, self._request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self._loop()
            self.train_model = self.model  # DDP's wrapper (and its reducer) goes before the process group
            finish_processes()  # leave together: no process tears down while another still talks
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
            if self.wandb is not None:
                self.wandb.finish()
            # DDP's reducer holds the process group and threads of its own: let it go first, so that
            # nothing of gloo is torn down from an interpreter-exit destructor
            self.train_model = self.model
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
            self._release()

    def _loop(self) -> None:
        cfg, state = self.cfg, self.state
        if self.finished:
            self.procs.note(f"the run already finished at iteration {state.iter} (run.max_iters): "
                            f"to train on, resume with a larger --run.max_iters")
            return
        t_last, iters_since_log, evaluated_at = time.perf_counter(), 0, None
        self.tokens_since_log = 0
        while state.iter < cfg.run.max_iters:
            if state.iter % cfg.eval.eval_interval == 0 and (state.iter != self.start_iter or self.resumed_before_eval):
                if not self.evaluate_and_save():
                    return
                evaluated_at = state.iter
                t_last, iters_since_log, self.tokens_since_log = time.perf_counter(), 0, 0  # not step time
            if cfg.eval.early_stopping and state.evals_since_best >= cfg.eval.early_stopping:
                if self.procs.is_main:
                    print(f"early stopping: no better {state.best_metric} in {state.evals_since_best} evaluations")
                evaluated_at = state.iter if evaluated_at is None else evaluated_at
                break
            lr = lr_at(state.iter, cfg.optim, cfg.run.max_iters)
            result = self.step(lr)
            if result is None:  # a stop request between micro-steps: the step was dropped
                self.procs.note(f"stopping at iteration {state.iter} (signal received; the unfinished step is "
                                f"dropped)" + ("" if evaluated_at == state.iter else ": writing a checkpoint"))
                if evaluated_at != state.iter:  # else the evaluation's checkpoint is this very state
                    self.save(metrics=None)
                return
            loss, grad_norm, stop = result
            state.iter += 1
            iters_since_log += 1
            if state.iter % cfg.log.log_interval == 0 or state.iter == cfg.run.max_iters:
                now = time.perf_counter()
                self._log_step(loss, lr, grad_norm, now - t_last, iters_since_log)
                t_last, iters_since_log, self.tokens_since_log = now, 0, 0
            if stop:
                if self.procs.is_main:
                    print(f"stopping at iteration {state.iter} (signal received): writing a checkpoint")
                self.save(metrics=None)
                return
        if evaluated_at != state.iter and not self.evaluate_and_save():
            return
        self.final_evaluation()
        if self.procs.is_main:
            print(f"done: {state.iter} iterations, best {state.best_metric} {state.best:.4f}, "
                  f"checkpoints in {self.out_dir}")
            if cfg.log.plot:
                from gpt.plot import plot_metrics

                plot_metrics(self.metrics, self.out_dir / "loss.png")

    def step(self, lr: float) -> tuple[float, float, bool] | None:
        """One optimiser step over grad_accum micro-batches in each process.

        Returns the mean loss over all of them, the gradient norm before clipping, and
        whether any process was asked to stop. In a single process, a stop request between
        micro-steps drops the step (None): data position and random generators are put back,
        so a resumed run takes the same step exactly.
        """
        set_lr(self.optimizers, lr / self.cfg.optim.lr)
        droppable = self.procs.world_size == 1 and self.grad_accum > 1
        if droppable:
            before = (self.task.state_dict(), torch.get_rng_state(),
                      torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None)
        total = torch.zeros((), device=self.device)
        for micro in range(self.grad_accum):
            if droppable and self.stop_requested:
                self._zero_grad()
                self.task.load_state_dict(before[0])
                torch.set_rng_state(before[1])
                if before[2] is not None:
                    torch.cuda.set_rng_state_all(before[2])
                return None
            batch = to_device(self.task.next_batch(), self.device)
            self.tokens_since_log += batch[0].numel() * self.procs.world_size
            last = micro == self.grad_accum - 1
            # gradients are averaged over processes on the last micro-step only
            with gradient_sync(self.train_model, last or self.procs.world_size == 1):
                with self._autocast():
                    loss = self.task.loss(self.train_model, batch) / self.grad_accum  # summed gradient = full batch's mean
                self.scaler.scale(loss).backward()
            total += loss.detach()
        for optimizer in self.optimizers:
            self.scaler.unscale_(optimizer)
        clip = self.cfg.optim.grad_clip or float("inf")
        grad_norm = clip_grad_norm(self.model, clip)
        # fp16 gradients that overflowed anywhere skip every optimizer's step, and update() lowers the
        # scale (GradScaler.step alone would decide per optimizer: Muon could step while AdamW skips)
        overflowed = self.scaler.is_enabled() and not torch.isfinite(grad_norm).item()
        if not overflowed:
            for optimizer in self.optimizers:
                self.scaler.step(optimizer)
        self.scaler.update()
        self._zero_grad()

        summary = torch.stack([total.float(), torch.tensor(float(self.stop_requested), device=self.device)])
        all_reduce_sum(summary)
        summary[0] /= self.procs.world_size
        loss_value, stop = summary.tolist()
        if not math.isfinite(loss_value) and not self.scaler.is_enabled():
            last = self.out_dir / "ckpt.pt"
            raise TrainingDiverged(
                f"the loss is {loss_value} at iteration {self.state.iter + 1}: stopping. The last good checkpoint is "
                f"{last if last.exists() else '(none yet)'}; try a lower optim.lr or optim.grad_clip"
            )
        return loss_value, grad_norm.item(), stop > 0

    def _autocast(self):
        return autocast(self.device, self.dtype)

    def _eval_batch(self):
        """The context of one evaluation batch: mixed precision, after a check for a stop request
        (one process only: under torchrun the stop lands at the end of the next training step,
        where the processes agree on it)."""
        if self.stop_requested and self.procs.world_size == 1:
            raise _Stopped
        return self._autocast()

    # ---- evaluation and checkpoints ---------------------------------------------------------------

    def evaluate(self, splits: tuple[str, ...]) -> tuple[dict, str]:
        """The task's evaluation of `splits`, summed over all processes: (metrics, a line to print)."""
        self.compiled.eval()
        self.phase = "evaluation"
        try:
            sums = {split: self.task.evaluate(self.compiled, split, self.device, self._eval_batch) for split in splits}
        finally:
            self.phase = "training"
            self.compiled.train()
        for split_sums in sums.values():
            for value in split_sums.values():
                all_reduce_sum(value)
        return self.task.summarize(sums)

    def evaluate_and_save(self) -> bool:
        """Evaluate, log, checkpoint; False if a stop request cut the evaluation short (then a
        checkpoint without metrics is written, and a resumed run evaluates first)."""
        try:
            metrics, line = self.evaluate(self.task.eval_splits)
        except _Stopped:
            self.procs.note(f"stopping at iteration {self.state.iter} (signal received during the evaluation): "
                            f"writing a checkpoint")
            self.save(metrics=None)
            return False
        is_best = self.state.improves(metrics[self.state.best_metric], self.task.higher_is_better)
        lr = lr_at(max(self.state.iter - 1, 0), self.cfg.optim, self.cfg.run.max_iters)
        first, *rest = line.split("\n")
        self._record({"iter": self.state.iter, **metrics, "lr": lr},
                     "\n".join([f"eval {self.state.iter}: {first}" + (" (best)" if is_best else ""), *rest]))
        self.save(metrics=metrics, is_best=is_best)
        return True

    def final_evaluation(self) -> None:
        """The task's final splits (e.g. a test set), with the best checkpoint's weights."""
        if not self.task.final_splits:
            return
        barrier()  # best.pt is complete
        best = load_checkpoint(self.out_dir / BEST)
        if "shards" in best:
            self._read_shards(best, self.out_dir / BEST)
        else:
            load_model_state(self.model, best["model"])
        try:
            metrics, line = self.evaluate(self.task.final_splits)
        except _Stopped:
            self.procs.note("the final evaluation was stopped (signal received)")
            return
        self._record({"iter": best["iter"], **metrics},
                     f"{'/'.join(self.task.final_splits)} (best checkpoint, iteration {best['iter']}): {line}")

    def save(self, metrics: dict | None, is_best: bool = False) -> None:
        rngs = [rng_state()]
        if self.procs.world_size > 1:
            rngs = [None] * self.procs.world_size
            torch.distributed.all_gather_object(rngs, rng_state())
        if is_sharded(self.model):  # every process writes its shards; the file names their directory
            optimizers = self.optimizers if stepped(self.optimizers) else None  # none before the first step
            weights = {"shards": write_shards(sharded_state(self.model, optimizers), self.out_dir, self.state.iter),
                       "shards_hold_optimizer": optimizers is not None}
        else:
            weights = {"model": self.model.state_dict(), "optimizer": optimizer_state(self.model, self.optimizers)}
        if not self.procs.is_main:
            return
        state = {
            "task": self.cfg.run.task,
            **weights,
            "model_config": dataclasses.asdict(self.model.config),
            **self.task.checkpoint_info(),
            "config": self.cfg.to_dict(),
            "scaler": self.scaler.state_dict(),
            "sampler": self.task.state_dict(),
            "rng": rngs,
            "micro_batches_per_step": self.grad_accum * self.procs.world_size,
            **self.state.state_dict(),
            "metrics": metrics,
        }
        save_checkpoint(state, self.out_dir, keep_last=self.cfg.run.keep_last, is_best=is_best)

    # ---- logging -------------------------------------------------------------------------------

    def _log_step(self, loss: float, lr: float, grad_norm: float, seconds: float, iters: int) -> None:
        seconds_per_iter, tokens_per_sec = seconds / iters, self.tokens_since_log / seconds
        backbone = getattr(self.model, "backbone", self.model)
        mfu = backbone.estimate_mfu(tokens_per_sec / self.procs.world_size, self.device)
        eta = (self.cfg.run.max_iters - self.state.iter) * seconds_per_iter
        line = (f"iter {self.state.iter}: loss {loss:.4f}, lr {lr:.2e}, norm {grad_norm:.2f}, "
                f"{seconds_per_iter * 1e3:.0f} ms/iter, {tokens_per_sec:,.0f} tok/s"
                + (f", mfu {mfu:.1%}" if mfu is not None else "") + f", eta {_duration(eta)}")
        self._record({"iter": self.state.iter, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                      "ms_per_iter": seconds_per_iter * 1e3, "tokens_per_sec": tokens_per_sec, "mfu": mfu}, line)

    def _record(self, record: dict, line: str) -> None:
        if not self.procs.is_main:
            return
        print(line, flush=True)
        with open(self.metrics, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            numbers = {k: v for k, v in record.items() if k != "iter" and isinstance(v, (int, float))}
            self.wandb.log(numbers, step=record["iter"])

    # ---- signals -------------------------------------------------------------------------------

    def _request_stop(self, signum, frame) -> None:
        if self.stop_requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.stop_requested = True
        if not self.procs.is_main:
            return
        if self.procs.world_size > 1:  # the processes agree on stopping at the end of a step
            now = "finishing this step"
        elif self.phase == "evaluation":
            now = "stopping after this evaluation batch"
        elif self.grad_accum > 1:
            now = "stopping after this micro-step"
        else:
            now = "finishing this step"
        print(f"\n{signal.Signals(signum).name}: {now}, then saving (Ctrl-C again to abort)", flush=True)


    # ---- leaving -------------------------------------------------------------------------------

    def _zero_grad(self) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)

    def _release(self) -> None:
        """Let other runs write out_dir again."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _abandon(self) -> None:
        """A set-up that failed: release out_dir, and remove it if this run created it and wrote
        nothing there (a failed start leaves the file system as it was)."""
        if self.created_out_dir and self.lock is not None:  # never a directory another run holds
            leftovers = [p for p in self.out_dir.iterdir() if p.name != DirectoryLock.NAME]
            if not leftovers:
                shutil.rmtree(self.out_dir, ignore_errors=True)
        self._release()


def _remove(path: Path) -> None:
    """A checkpoint file, or a directory of shards."""
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _engine(system, world_size: int) -> str:
    """How the run is spread and what it recomputes, for the first line of output."""
    parts = ([system.parallel] if world_size > 1 or system.parallel != "ddp" else []) + \
        (["activation checkpointing"] if system.activation_checkpointing != "none" else [])
    return f" ({', '.join(parts)})" if parts else ""


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
