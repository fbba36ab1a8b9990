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


# ---- the trainer ----------------------------------------------------------------------------


class Trainer:
    def __init__(self, cfg: Config):
        self.device = pick_device(cfg.system.device)
        self.procs = start_processes(self.device)
        self.dtype = pick_dtype(cfg.system.dtype, self.device)
        self.out_dir = Path(cfg.run.out_dir)
        if self.device.type == "cuda":
            torch.set_float32_matmul_precision("high")  # TF32 matmuls
        self._prepare_out_dir(fresh=cfg.run.init_from != "resume")

        # data
        data_dir = self._data_dir(cfg)
        self.train_data, self.val_data = TokenDataset(data_dir, "train"), TokenDataset(data_dir, "val")
        self.tokenizer_spec = self.train_data.meta["tokenizer"]

        # model: fresh, from Hugging Face GPT-2, or from our checkpoint
        torch.manual_seed(cfg.run.seed)
        resume = cfg.run.init_from == "resume"
        ckpt = load_checkpoint(find_checkpoint(self.out_dir)) if resume else None
        self.raw_model = self._build_model(cfg, ckpt).to(self.device)
        cfg = dataclasses.replace(cfg, model=self.raw_model.config)  # the resolved architecture
        self.cfg = cfg
        T = cfg.model.block_size
        for data in (self.train_data, self.val_data):
            data.check(T, cfg.model.vocab_size)

        # batch: micro-batch x accumulation x processes
        self.grad_accum = self._grad_accum(cfg)
        self.tokens_per_step = cfg.batch.batch_size * T * self.grad_accum * self.procs.world_size

        self.optimizer = make_optimizer(self.raw_model, cfg.optim, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.sampler = WindowSampler(self.train_data.num_windows(T), cfg.batch.batch_size, seed=cfg.run.seed,
                                     rank=self.procs.rank, world_size=self.procs.world_size)
        self.eval_batches = {
            split: eval_indices(data.num_windows(T), cfg.batch.batch_size, cfg.eval.eval_iters,
                                rank=self.procs.rank, world_size=self.procs.world_size)
            for split, data in (("train", self.train_data), ("val", self.val_data))
        }
        self.iter, self.best_val_loss, self.wandb_id = 0, float("inf"), None
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
        if self.procs.is_main:
            save_config(cfg, self.out_dir / "config.toml")
            self._trim_metrics()
            self._start_wandb()
        self.stop_requested = False

    # ---- setup helpers -----------------------------------------------------------------------

    def _prepare_out_dir(self, fresh: bool) -> None:
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
        previous = [*self.out_dir.glob("ckpt*.pt"), *self.out_dir.glob("best.pt")]
        if fresh and previous:  # a new run here: the old checkpoints would mix with the new ones
            for path in previous:
                path.unlink()
            print(f"note: starting a new run in {self.out_dir}: removed the previous run's "
                  f"{len(previous)} checkpoint file(s) (use --resume to continue a run instead)")

    def _data_dir(self, cfg: Config) -> Path:
        data_dir = Path(cfg.data.dir)
        shipped = data_dir.name in TOKENIZERS and (data_dir.parent / "texts").is_dir()
        if shipped and not (data_dir / "meta.json").exists():
            if self.procs.local_rank == 0:
                ensure_prepared(data_dir.parent, data_dir.name, val_fraction=cfg.data.val_fraction)
            self._barrier()
        return data_dir

    def _build_model(self, cfg: Config, ckpt: dict | None) -> GPT:
        explicit = {k.split(".", 1)[1] for k in cfg.explicit if k.startswith("model.")}
        data_vocab = self.train_data.vocab_size
        if ckpt is not None:
            if ckpt["tokenizer"] != self.tokenizer_spec:
                raise UserError(f"the checkpoint in {self.out_dir} was trained on {ckpt['tokenizer']['name']} tokens, "
                                f"but {cfg.data.dir} holds {self.tokenizer_spec['name']} tokens: resume on the same data")
            source, model_config = f"the checkpoint in {self.out_dir}", GPTConfig(**ckpt["model_config"])
            model_config.dropout = cfg.model.dropout if "dropout" in explicit else model_config.dropout
            model = GPT(model_config)
        elif cfg.run.init_from == "scratch":
            if "vocab_size" in explicit and cfg.model.vocab_size != data_vocab:
                raise UserError(f"model.vocab_size = {cfg.model.vocab_size}, but {cfg.data.dir} has {data_vocab} token ids: "
                                f"remove model.vocab_size (it comes from the data) or prepare the data with the right tokenizer")
            return GPT(dataclasses.replace(cfg.model, vocab_size=data_vocab))
        else:  # a Hugging Face GPT-2: continued pretraining
            model = GPT.from_pretrained(cfg.run.init_from, dropout=cfg.model.dropout)
            source, model_config = cfg.run.init_from, model.config
            if "block_size" in explicit and cfg.model.block_size < model_config.block_size:
                model.crop_block_size(cfg.model.block_size)
        for name in sorted(explicit - {"dropout"}):
            ours, theirs = getattr(cfg.model, name), getattr(model.config, name)
            if ours != theirs:
                raise UserError(f"{source} has model.{name} = {theirs}, but the config says {ours}: "
                                f"remove model.{name} from the config, or start a new run.out_dir")
        return model

    def _grad_accum(self, cfg: Config) -> int:
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

    def _restore(self, ckpt: dict) -> None:
        self.raw_model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.sampler.load_state_dict(ckpt["sampler"])
        self.iter, self.best_val_loss = ckpt["iter"], ckpt["best_val_loss"]
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
            print(f"training {self.raw_model.num_params() / 1e6:.2f}M parameters on {self.device} ({str(self.dtype)[6:]}), "
                  f"{self.procs.world_size} process(es), {self.tokens_per_step:,} tokens per step "
                  f"({cfg.batch.batch_size} x {cfg.model.block_size} x {self.grad_accum} accumulation x "
                  f"{self.procs.world_size}), iterations {self.iter} -> {cfg.run.max_iters}")
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
        while self.iter < cfg.run.max_iters:
            if self.iter % cfg.eval.eval_interval == 0 and self.iter != self.start_iter:
                self.evaluate_and_save()
                evaluated_at = self.iter
                t_last, iters_since_log = time.perf_counter(), 0  # evaluation time is not step time
            lr = lr_at(self.iter, cfg.optim, cfg.run.max_iters)
            loss, grad_norm, stop = self.step(lr)
            self.iter += 1
            iters_since_log += 1
            if self.iter % cfg.log.log_interval == 0 or self.iter == cfg.run.max_iters:
                now = time.perf_counter()
                self._log_step(loss, lr, grad_norm, (now - t_last) / iters_since_log)
                t_last, iters_since_log = now, 0
            if stop:
                if self.procs.is_main:
                    print(f"stopping at iteration {self.iter} (signal received): writing a checkpoint")
                self.save(val_loss=None)
                return
        if evaluated_at != self.iter:
            self.evaluate_and_save()
        if self.procs.is_main:
            print(f"done: {self.iter} iterations, best val loss {self.best_val_loss:.4f}, checkpoints in {self.out_dir}")
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
        T = self.cfg.model.block_size
        for micro in range(self.grad_accum):
            x, y = to_device(self.train_data.batch(self.sampler.next_indices(), T), self.device)
            last = micro == self.grad_accum - 1
            # DDP averages gradients over processes on the last micro-step only
            sync = contextlib.nullcontext() if last or self.procs.world_size == 1 else self.model.no_sync()
            with sync:
                with self._autocast():
                    _, loss = self.model(x, y)
                    loss = loss / self.grad_accum  # so the summed gradient is the full batch's mean
                self.scaler.scale(loss).backward()
            total += loss.detach()
        self.scaler.unscale_(self.optimizer)
        clip = self.cfg.optim.grad_clip or float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), clip)
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

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss over the fixed evaluation batches of each split, over all processes."""
        self.eval_model.eval()
        T = self.cfg.model.block_size
        means = []
        for split, data in (("train", self.train_data), ("val", self.val_data)):
            total = torch.zeros((), device=self.device)
            for indices in self.eval_batches[split]:
                x, y = to_device(data.batch(indices, T), self.device)
                with self._autocast():
                    total += self.eval_model(x, y)[1].float()
            means.append(total / len(self.eval_batches[split]))
        self.eval_model.train()
        losses = torch.stack(means)
        if self.procs.world_size > 1:
            dist.all_reduce(losses)
            losses /= self.procs.world_size
        train_loss, val_loss = losses.tolist()
        return {"train_loss": train_loss, "val_loss": val_loss}

    def evaluate_and_save(self) -> None:
        result = self.evaluate()
        is_best = result["val_loss"] < self.best_val_loss
        self.best_val_loss = min(self.best_val_loss, result["val_loss"])
        lr = lr_at(max(self.iter - 1, 0), self.cfg.optim, self.cfg.run.max_iters)
        self._record({"iter": self.iter, **result, "lr": lr},
                     f"eval {self.iter}: train loss {result['train_loss']:.4f}, val loss {result['val_loss']:.4f}"
                     + (" (best)" if is_best else ""))
        self.save(val_loss=result["val_loss"], is_best=is_best)

    def save(self, val_loss: float | None, is_best: bool = False) -> None:
        rngs = [rng_state()]
        if self.procs.world_size > 1:
            rngs = [None] * self.procs.world_size
            dist.all_gather_object(rngs, rng_state())
        if not self.procs.is_main:
            return
        state = {
            "format_version": 1,
            "iter": self.iter,
            "model": self.raw_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "rng": rngs,
            "config": self.cfg.to_dict(),
            "model_config": dataclasses.asdict(self.raw_model.config),
            "tokenizer": self.tokenizer_spec,
            "best_val_loss": self.best_val_loss,
            "val_loss": val_loss,
            "wandb_id": self.wandb_id,
        }
        save_checkpoint(state, self.out_dir, keep_last=self.cfg.run.keep_last, is_best=is_best)

    # ---- logging -------------------------------------------------------------------------------

    def _log_step(self, loss: float, lr: float, grad_norm: float, seconds_per_iter: float) -> None:
        tokens_per_sec = self.tokens_per_step / seconds_per_iter
        mfu = self.raw_model.estimate_mfu(tokens_per_sec / self.procs.world_size, self.device)
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
            self.wandb.log({k: v for k, v in record.items() if k != "iter" and v is not None}, step=record["iter"])

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
