"""The training loop: one process, or one of many under torchrun (DDP).

    trainer = Trainer(load_config("configs/shakespeare_char.toml"))
    trainer.train()

Read it top to bottom: where to run (device, precision, processes), the learning
rate schedule and the optimiser, then the Trainer, whose __init__ sets up data,
model and state (fresh, from Hugging Face GPT-2, or resumed from a checkpoint)
and whose train() runs the loop: evaluate and checkpoint every eval_interval,
one optimiser step per iteration (gradient accumulation inside), a log line
every log_interval.

Exactness: everything that decides what happens next (weights, optimiser and
grad-scaler state, the data sampler's position, every random generator, the
iteration) is in the checkpoint, so a resumed run continues exactly; on CPU its
losses and weights are bit-identical to an uninterrupted run's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from gpt.checkpoint import find_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from gpt.config import Config, OptimConfig, save_config
from gpt.dataset import TokenDataset, WindowSampler, eval_indices, to_device
from gpt.errors import UserError
from gpt.model import GPT, GPTConfig
from gpt.prepare import ensure_prepared
from gpt.tokenizer import TOKENIZERS


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf: the run stops (train.py exits with status 1)."""


# ---- where to run -------------------------------------------------------------------------


@dataclass
class Processes:
    rank: int = 0  # this process among all of them
    local_rank: int = 0  # this process on its machine (picks the GPU)
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def start_processes(device: torch.device) -> Processes:
    """Join the process group when launched by torchrun (it sets RANK, LOCAL_RANK, WORLD_SIZE)."""
    if "RANK" not in os.environ:
        return Processes()
    procs = Processes(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]))
    if device.type == "cuda":
        torch.cuda.set_device(procs.local_rank)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return procs


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        raise UserError(f"system.device {name!r} is not usable here ({str(e).splitlines()[0]}): use \"auto\" or \"cpu\"") from None
    if device.type == "cuda" and "RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bf16 autocast on GPUs that support it, else fp16 (with a grad scaler); fp32 elsewhere."""
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return getattr(torch, name)


# ---- optimisation -------------------------------------------------------------------------


def lr_at(it: int, optim: OptimConfig, max_iters: int) -> float:
    """The learning rate of iteration `it`: linear warmup, then cosine, constant or WSD."""
    if it < optim.warmup_iters:
        return optim.lr * (it + 1) / (optim.warmup_iters + 1)
    if optim.schedule == "constant":
        return optim.lr
    if optim.schedule == "wsd":  # stable at lr, then a linear decay to min_lr over the last decay_iters
        decay = optim.decay_iters or max(1, round(0.2 * max_iters))
        progress = min(1.0, max(0.0, (it - (max_iters - decay)) / decay))
        return optim.lr - progress * (optim.lr - optim.min_lr)
    end = optim.decay_iters or max_iters  # cosine from lr to min_lr between warmup and end
    if it >= end:
        return optim.min_lr
    progress = (it - optim.warmup_iters) / max(1, end - optim.warmup_iters)
    return optim.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (optim.lr - optim.min_lr)


def make_optimizer(model: GPT, optim: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices and embeddings (dim >= 2), not on biases and norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": optim.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.beta1, optim.beta2), fused=device.type == "cuda")


# ---- the task: what is learned from which data ---------------------------------------------------
# A task owns the data, builds the model, hands out micro-batches, computes the loss and
# the evaluation. The Trainer owns everything else (processes, precision, optimiser,
# checkpoints, logging). gpt/classify.py has the other task, text classification.


class LanguageModeling:
    """Next-token prediction on a corpus prepared by gpt.prepare (run.task = "lm")."""

    best_metric, higher_is_better = "val_loss", False

    def __init__(self, cfg: Config, procs: Processes, barrier):
        data_dir = Path(cfg.data.dir)
        shipped = data_dir.name in TOKENIZERS and (data_dir.parent / "texts").is_dir()
        if shipped and not (data_dir / "meta.json").exists():  # e.g. data/shakespeare/char, on first use
            if procs.local_rank == 0:
                ensure_prepared(data_dir.parent, data_dir.name, val_fraction=cfg.data.val_fraction)
            barrier()
        self.train_data, self.val_data = TokenDataset(data_dir, "train"), TokenDataset(data_dir, "val")
        self.tokenizer_spec = self.train_data.meta["tokenizer"]
        self.procs = procs

    def build_model(self, cfg: Config, ckpt: dict | None, out_dir: Path) -> GPT:
        """Fresh, from our checkpoint (resume) or from a Hugging Face GPT-2 (continued pretraining)."""
        explicit = explicit_model_keys(cfg)
        data_vocab = self.train_data.vocab_size
        if ckpt is not None:
            if ckpt["tokenizer"] != self.tokenizer_spec:
                raise UserError(f"the checkpoint in {out_dir} was trained on {ckpt['tokenizer']['name']} tokens, "
                                f"but {cfg.data.dir} holds {self.tokenizer_spec['name']} tokens: resume on the same data")
            return check_architecture(backbone_from_checkpoint(ckpt, cfg), cfg, f"the checkpoint in {out_dir}")
        if cfg.run.init_from == "scratch":
            if "vocab_size" in explicit and cfg.model.vocab_size != data_vocab:
                raise UserError(f"model.vocab_size = {cfg.model.vocab_size}, but {cfg.data.dir} has {data_vocab} token ids: "
                                f"remove model.vocab_size (it comes from the data) or prepare the data with the right tokenizer")
            return GPT(dataclasses.replace(cfg.model, vocab_size=data_vocab))
        return pretrained_gpt2(cfg)

    def setup(self, cfg: Config) -> None:
        """Once the model is built: data checks, the sampler and the fixed evaluation batches."""
        self.T, self.batch_size = cfg.model.block_size, cfg.batch.batch_size
        for data in (self.train_data, self.val_data):
            data.check(self.T, cfg.model.vocab_size)
        p = self.procs
        self.sampler = WindowSampler(self.train_data.num_windows(self.T), self.batch_size, seed=cfg.run.seed,
                                     rank=p.rank, world_size=p.world_size)
        self.eval_batches = {
            split: eval_indices(data.num_windows(self.T), self.batch_size, cfg.eval.eval_iters, rank=p.rank,
                                world_size=p.world_size)
            for split, data in (("train", self.train_data), ("val", self.val_data))
        }

    def grad_accum(self, cfg: Config) -> int:
        if not cfg.batch.tokens_per_step:
            return cfg.batch.grad_accum
        per_micro_step = cfg.batch.batch_size * cfg.model.block_size * self.procs.world_size
        if cfg.batch.tokens_per_step % per_micro_step:
            raise UserError(
                f"batch.tokens_per_step ({cfg.batch.tokens_per_step:,}) must be a multiple of batch_size x block_size x "
                f"processes = {cfg.batch.batch_size} x {cfg.model.block_size} x {self.procs.world_size} = {per_micro_step:,}: "
                f"change tokens_per_step, batch_size or the number of processes"
            )
        return cfg.batch.tokens_per_step // per_micro_step

    def describe_step(self, grad_accum: int) -> str:
        w = self.procs.world_size
        return (f"{self.batch_size * self.T * grad_accum * w:,} tokens per step "
                f"({self.batch_size} x {self.T} x {grad_accum} accumulation x {w})")

    def next_batch(self) -> tuple[torch.Tensor, ...]:
        return self.train_data.batch(self.sampler.next_indices(), self.T)

    def loss(self, model, batch) -> torch.Tensor:
        return model(*batch)[1]

    @torch.no_grad()
    def evaluate(self, model, device, autocast, split: str = "val") -> dict[str, torch.Tensor]:
        """Sums over this process's share of the fixed batches (the Trainer adds up all processes)."""
        sums = {}
        for split, data in (("train", self.train_data), ("val", self.val_data)):
            total = torch.zeros((), device=device)
            for indices in self.eval_batches[split]:
                with autocast():
                    total += model(*to_device(data.batch(indices, self.T), device))[1].float()
            sums[f"{split}_loss"] = total
            sums[f"{split}_batches"] = torch.tensor(float(len(self.eval_batches[split])), device=device)
        return sums

    def summarize(self, sums: dict[str, torch.Tensor], split: str = "val") -> tuple[dict, str]:
        metrics = {f"{s}_loss": (sums[f"{s}_loss"] / sums[f"{s}_batches"]).item() for s in ("train", "val")}
        return metrics, f"train loss {metrics['train_loss']:.4f}, val loss {metrics['val_loss']:.4f}"

    def checkpoint_extras(self) -> dict:
        return {"tokenizer": self.tokenizer_spec}


def explicit_model_keys(cfg: Config) -> set[str]:
    return {k.split(".", 1)[1] for k in cfg.explicit if k.startswith("model.")}


def backbone_from_checkpoint(ckpt: dict, cfg: Config) -> GPT:
    """A GPT of a checkpoint's architecture (weights not loaded); an explicit model.dropout wins."""
    model_config = GPTConfig(**ckpt["model_config"])
    if "dropout" in explicit_model_keys(cfg):
        model_config.dropout = cfg.model.dropout
    return GPT(model_config)


def pretrained_gpt2(cfg: Config) -> GPT:
    """A Hugging Face GPT-2 (hub id or directory), its context cropped to an explicit model.block_size."""
    model = GPT.from_pretrained(cfg.run.init_from, dropout=cfg.model.dropout)
    if "block_size" in explicit_model_keys(cfg) and cfg.model.block_size < model.config.block_size:
        model.crop_block_size(cfg.model.block_size)
    return check_architecture(model, cfg, cfg.run.init_from)


def check_architecture(model: GPT, cfg: Config, source: str) -> GPT:
    """Refuse a config that sets a model field differently from the weights it starts from."""
    for name in sorted(explicit_model_keys(cfg) - {"dropout"}):
        ours, theirs = getattr(cfg.model, name), getattr(model.config, name)
        if ours != theirs:
            raise UserError(f"{source} has model.{name} = {theirs}, but the config says {ours}: "
                            f"remove model.{name} from the config, or start a new run.out_dir")
    return model


# ---- the trainer ----------------------------------------------------------------------------


class Trainer:
    def __init__(self, cfg: Config):
        self.device = pick_device(cfg.system.device)
        self.procs = start_processes(self.device)
        self.dtype = pick_dtype(cfg.system.dtype, self.device)
        self.out_dir = Path(cfg.run.out_dir)
        if self.device.type == "cuda":
            torch.set_float32_matmul_precision("high")  # TF32 matmuls
        self._prepare_out_dir()

        # the task's data and model: fresh, pretrained, or from our checkpoint (resume)
        if cfg.run.task == "classify":
            from gpt.classify import Classification

            self.task = Classification(cfg, self.procs)
        else:
            self.task = LanguageModeling(cfg, self.procs, self._barrier)
        torch.manual_seed(cfg.run.seed)
        ckpt = load_checkpoint(find_checkpoint(self.out_dir)) if cfg.run.init_from == "resume" else None
        self.raw_model = self.task.build_model(cfg, ckpt, self.out_dir).to(self.device)
        cfg = dataclasses.replace(cfg, model=self.raw_model.config)  # the resolved architecture
        self.cfg = cfg
        self.task.setup(cfg)
        self.grad_accum = self.task.grad_accum(cfg)

        self.optimizer = make_optimizer(self.raw_model, cfg.optim, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.iter, self.best, self.evals_since_best, self.wandb_id = 0, None, 0, None
        self.resumed_before_eval = False
        torch.manual_seed(cfg.run.seed + self.procs.rank)  # dropout differs between processes
        if ckpt is not None:
            self._restore(ckpt)
        self.start_iter = self.iter

        # the model that runs: compiled, then wrapped for DDP
        compile_ = cfg.system.compile if cfg.system.compile != "auto" else self.device.type == "cuda"
        self.model = torch.compile(self.raw_model) if compile_ else self.raw_model
        self.eval_model = self.model
        if self.procs.world_size > 1:
            self.model = DDP(self.model, device_ids=[self.procs.local_rank] if self.device.type == "cuda" else None)

        self.metrics = self.out_dir / "metrics.jsonl"
        self.wandb = None
        if ckpt is None:
            self._clear_previous_run()
        if ckpt is not None:  # the run's config keeps its original init_from (config.toml reproduces it)
            self.cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, init_from=ckpt["config"]["run"]["init_from"]))
        if self.procs.is_main:
            save_config(self.cfg, self.out_dir / "config.toml")
            self._trim_metrics()
            self._start_wandb()
        self.stop_requested, self.tokens_since_log = False, 0

    # ---- setup helpers -----------------------------------------------------------------------

    def _prepare_out_dir(self) -> None:
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            probe = self.out_dir / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise UserError(f"run.out_dir {self.out_dir} cannot be written ({e.strerror}): choose another directory") from None
        if not self.procs.is_main:
            return
        for stale in self.out_dir.glob(".*.tmp-*"):  # from a run killed while writing
            stale.unlink(missing_ok=True)

    def _clear_previous_run(self) -> None:
        """A new run in a used out_dir: the old checkpoints would mix with the new ones. Called
        once everything is set up, so a run that fails to start leaves them alone."""
        previous = [*self.out_dir.glob("ckpt*.pt"), *self.out_dir.glob("best.pt")]
        if self.procs.is_main and previous:
            for path in previous:
                path.unlink()
            print(f"note: starting a new run in {self.out_dir}: removed the previous run's "
                  f"{len(previous)} checkpoint file(s) (use --resume to continue a run instead)")

    def _restore(self, ckpt: dict) -> None:
        self.raw_model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt["scaler"] and self.scaler.is_enabled():  # empty when written without fp16
            self.scaler.load_state_dict(ckpt["scaler"])
        self.task.sampler.load_state_dict(ckpt["sampler"])
        self.iter, self.best, self.evals_since_best = ckpt["iter"], ckpt["best"], ckpt["evals_since_best"]
        if ckpt.get("best_metric") != self.task.best_metric:  # chosen by another metric: start over
            self.best, self.evals_since_best = None, 0
        self.resumed_before_eval = ckpt.get("metrics") is None  # stopped by a signal, not at an evaluation
        self.wandb_id = ckpt.get("wandb_id")
        rngs = ckpt["rng"]
        if len(rngs) == self.procs.world_size:
            set_rng_state(rngs[self.procs.rank])
        elif self.procs.is_main:
            print(f"note: the checkpoint was written by {len(rngs)} process(es), this run has "
                  f"{self.procs.world_size}: random generators start afresh (data order is unchanged)")

    def _trim_metrics(self) -> None:
        """On resume, forget records written after the checkpoint (they are about to be redone)."""
        if not self.metrics.exists():
            return
        lines = self.metrics.read_text().splitlines()
        kept = [line for line in lines if line and json.loads(line)["iter"] <= self.start_iter]
        self.metrics.write_text("".join(line + "\n" for line in kept))

    def _start_wandb(self) -> None:
        if not self.cfg.log.wandb:
            return
        try:
            import wandb
        except ImportError:
            raise UserError("log.wandb = true but wandb is not installed: pip install 'gpt[wandb]', "
                            "or set log.wandb = false") from None
        self.wandb = wandb.init(project=self.cfg.log.wandb_project, name=self.cfg.log.wandb_run_name or self.out_dir.name,
                                config=self.cfg.to_dict(), dir=str(self.out_dir), id=self.wandb_id, resume="allow")
        self.wandb_id = self.wandb.id

    # ---- the loop ------------------------------------------------------------------------------

    def train(self) -> None:
        cfg = self.cfg
        if self.procs.is_main:
            trainable = sum(p.numel() for p in self.raw_model.parameters() if p.requires_grad)
            print(f"training {trainable / 1e6:.2f}M parameters on {self.device} ({str(self.dtype)[6:]}), "
                  f"{self.procs.world_size} process(es), {self.task.describe_step(self.grad_accum)}, "
                  f"iterations {self.iter} -> {cfg.run.max_iters}")
        handlers = {s: signal.signal(s, self._request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self._loop()
            self._barrier()  # leave together: no process tears down while another still talks
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
            if self.wandb is not None:
                self.wandb.finish()
            if dist.is_initialized():
                dist.destroy_process_group()

    def _loop(self) -> None:
        cfg = self.cfg
        t_last, iters_since_log, evaluated_at = time.perf_counter(), 0, None
        self.tokens_since_log = 0
        while self.iter < cfg.run.max_iters:
            if self.iter % cfg.eval.eval_interval == 0 and (self.iter != self.start_iter or self.resumed_before_eval):
                self.evaluate_and_save()
                evaluated_at = self.iter
                t_last, iters_since_log, self.tokens_since_log = time.perf_counter(), 0, 0  # not step time
            if cfg.eval.early_stopping and self.evals_since_best >= cfg.eval.early_stopping:
                if self.procs.is_main:
                    print(f"early stopping: no better {self.task.best_metric} in {self.evals_since_best} evaluations")
                evaluated_at = self.iter if evaluated_at is None else evaluated_at
                break
            lr = lr_at(self.iter, cfg.optim, cfg.run.max_iters)
            loss, grad_norm, stop = self.step(lr)
            self.iter += 1
            iters_since_log += 1
            if self.iter % cfg.log.log_interval == 0 or self.iter == cfg.run.max_iters:
                now = time.perf_counter()
                self._log_step(loss, lr, grad_norm, now - t_last, iters_since_log)
                t_last, iters_since_log, self.tokens_since_log = now, 0, 0
            if stop:
                if self.procs.is_main:
                    print(f"stopping at iteration {self.iter} (signal received): writing a checkpoint")
                self.save(metrics=None)
                return
        if evaluated_at != self.iter:
            self.evaluate_and_save()
        if hasattr(self.task, "finish"):
            self.task.finish(self)
        if self.procs.is_main:
            print(f"done: {self.iter} iterations, best {self.task.best_metric} {self.best:.4f}, "
                  f"checkpoints in {self.out_dir}")
            if cfg.log.plot:
                from gpt.plot import plot_metrics

                plot_metrics(self.metrics, self.out_dir / "loss.png")

    def step(self, lr: float) -> tuple[float, float, bool]:
        """One optimiser step over grad_accum micro-batches in each process.

        Returns the mean loss over all of them, the gradient norm before clipping, and
        whether any process was asked to stop.
        """
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = torch.zeros((), device=self.device)
        for micro in range(self.grad_accum):
            batch = to_device(self.task.next_batch(), self.device)
            self.tokens_since_log += batch[0].numel() * self.procs.world_size
            last = micro == self.grad_accum - 1
            # DDP averages gradients over processes on the last micro-step only
            sync = contextlib.nullcontext() if last or self.procs.world_size == 1 else self.model.no_sync()
            with sync:
                with self._autocast():
                    loss = self.task.loss(self.model, batch) / self.grad_accum  # summed gradient = full batch's mean
                self.scaler.scale(loss).backward()
            total += loss.detach()
        self.scaler.unscale_(self.optimizer)
        clip = self.cfg.optim.grad_clip or float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_([p for p in self.raw_model.parameters() if p.requires_grad], clip)
        self.scaler.step(self.optimizer)  # skips the step if fp16 gradients overflowed
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

        summary = torch.stack([total.float(), torch.tensor(float(self.stop_requested), device=self.device)])
        if self.procs.world_size > 1:
            dist.all_reduce(summary)  # SUM (gloo has no AVG)
            summary[0] /= self.procs.world_size
        loss_value, stop = summary.tolist()
        if not math.isfinite(loss_value) and not self.scaler.is_enabled():
            last = self.out_dir / "ckpt.pt"
            raise TrainingDiverged(
                f"the loss is {loss_value} at iteration {self.iter + 1}: stopping. The last good checkpoint is "
                f"{last if last.exists() else '(none yet)'}; try a lower optim.lr or optim.grad_clip"
            )
        return loss_value, grad_norm.item(), stop > 0

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def evaluate(self, split: str = "val") -> tuple[dict, str]:
        """The task's evaluation, summed over all processes: (metrics, a line to print)."""
        self.eval_model.eval()
        sums = self.task.evaluate(self.eval_model, self.device, self._autocast, split)
        self.eval_model.train()
        if self.procs.world_size > 1:
            for value in sums.values():
                dist.all_reduce(value)  # SUM
        return self.task.summarize(sums, split)

    def evaluate_and_save(self) -> None:
        metrics, line = self.evaluate()
        value = metrics[self.task.best_metric]
        is_best = self.best is None or (value > self.best if self.task.higher_is_better else value < self.best)
        self.best = value if is_best else self.best
        self.evals_since_best = 0 if is_best else self.evals_since_best + 1
        lr = lr_at(max(self.iter - 1, 0), self.cfg.optim, self.cfg.run.max_iters)
        first, *rest = line.split("\n")
        self._record({"iter": self.iter, **metrics, "lr": lr},
                     "\n".join([f"eval {self.iter}: {first}" + (" (best)" if is_best else ""), *rest]))
        self.save(metrics=metrics, is_best=is_best)

    def save(self, metrics: dict | None, is_best: bool = False) -> None:
        rngs = [rng_state()]
        if self.procs.world_size > 1:
            rngs = [None] * self.procs.world_size
            dist.all_gather_object(rngs, rng_state())
        if not self.procs.is_main:
            return
        state = {
            "format_version": 1,
            "task": self.cfg.run.task,
            "iter": self.iter,
            "model": self.raw_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "sampler": self.task.sampler.state_dict(),
            "rng": rngs,
            "config": self.cfg.to_dict(),
            "model_config": dataclasses.asdict(self.raw_model.config),
            **self.task.checkpoint_extras(),
            "best": self.best,
            "best_metric": self.task.best_metric,
            "evals_since_best": self.evals_since_best,
            "metrics": metrics,
            "wandb_id": self.wandb_id,
        }
        save_checkpoint(state, self.out_dir, keep_last=self.cfg.run.keep_last, is_best=is_best)

    # ---- logging -------------------------------------------------------------------------------

    def _log_step(self, loss: float, lr: float, grad_norm: float, seconds: float, iters: int) -> None:
        seconds_per_iter, tokens_per_sec = seconds / iters, self.tokens_since_log / seconds
        backbone = getattr(self.raw_model, "backbone", self.raw_model)
        mfu = backbone.estimate_mfu(tokens_per_sec / self.procs.world_size, self.device)
        eta = (self.cfg.run.max_iters - self.iter) * seconds_per_iter
        line = (f"iter {self.iter}: loss {loss:.4f}, lr {lr:.2e}, norm {grad_norm:.2f}, "
                f"{seconds_per_iter * 1e3:.0f} ms/iter, {tokens_per_sec:,.0f} tok/s"
                + (f", mfu {mfu:.1%}" if mfu is not None else "") + f", eta {_duration(eta)}")
        self._record({"iter": self.iter, "loss": loss, "lr": lr, "grad_norm": grad_norm,
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

    # ---- processes and signals --------------------------------------------------------------------

    def _barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def _request_stop(self, signum, frame) -> None:
        if self.stop_requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.stop_requested = True
        if self.procs.is_main:
            print(f"\n{signal.Signals(signum).name}: finishing this step, then saving (Ctrl-C again to abort)", flush=True)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
