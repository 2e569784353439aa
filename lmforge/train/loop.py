"""The one training loop. Pretraining and every fine-tuning method run through `train`.

Methods differ by what they hand in: the batches (a loader with `next_batch`/`state_dict`), the loss
(`loss_fn`, returning a summed loss and how many targets it sums), which parameters have
`requires_grad`, and how they save — never by a copy of this loop. Setup, resume and reporting around it
live in the one shell (`lmforge.train.shell`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from torch import Tensor, nn

from lmforge.checkpoint import SHARDED, rng_state, save_checkpoint, set_rng_state
from lmforge.errors import ConfigError
from lmforge.precision import autocast, default_precision, measure_peak_flops
from lmforge.progress import Progress
from lmforge.train.distributed import Dist, Strategy, all_reduce_sum, clip_grad_norm, from_rank0, no_sync, wrap
from lmforge.train.loaders import real_tokens
from lmforge.train.losses import lm_loss
from lmforge.train.metrics import Logger, MetricsLog
from lmforge.train.optim import build_optimizer, lr_at, set_lr

Precision = Literal["bf16-mixed", "32"]
LossFn = Callable[[nn.Module, Any, Tensor], tuple[Tensor, Tensor]]
SaveFn = Callable[[dict[str, Any], int], None]


class Batches(Protocol):
    """A loader; `batches_per_epoch` (for epochs), `tokens_per_epoch` (max_tokens) and `block_size` (MFU)
    are read where it has them."""

    def next_batch(self) -> tuple[Tensor | dict[str, Tensor], Tensor]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class TrainConfig:
    """How long and how to optimise; saved in train_state.pt, so `--resume` continues with the same settings.

    Args:
        max_steps: Stop after this many optimizer steps.
        max_tokens: Stop after this many real training tokens (targets, unpadded texts), summed over processes.
        max_minutes: Stop after this much training wall time, summed over resumes (as max_steps counts all steps);
            a checkpoint is always written at the end.
        epochs: Stop after this many passes over the training data (fine-tuning: 3 when no limit is set).
        batch_size: Examples (token windows or texts) per micro-batch, per process under torchrun.
        grad_accum: Micro-batches accumulated into one optimizer step.
        lr: Peak learning rate after warmup.
        min_lr_ratio: Final learning rate as a fraction of the peak.
        warmup_steps: Steps of linear warmup.
        lr_decay_steps: Steps over which the schedule decays (default: the step limit; with max_minutes alone,
            the time budget).
        schedule: Learning-rate decay after warmup.
        optimizer: Optimizer; weight decay applies to matrices only.
        weight_decay: Decoupled weight decay (AdamW) or L2 penalty (others).
        beta1: Adam's first-moment decay.
        beta2: Adam's second-moment decay.
        grad_clip: Clip the global gradient norm to this value; null disables.
        precision: "bf16-mixed" or "32"; by default the faster one on this machine.
        eval_every: Steps between validation losses (on the val split or val_data).
        eval_batches: Batches per validation loss.
        save_every: Steps between checkpoints (one is always written at the end).
        log_every: Steps between progress and metrics lines.
        logger: Step metrics go to metrics.jsonl; "tensorboard" (or "both") adds TensorBoard files in out/tensorboard/.
        seed: Seed for initialisation, data order and dropout.
        strategy: Under torchrun: "ddp" replicates the model on every process, "fsdp" shards parameters,
            gradients and optimizer state over them (FSDP2; checkpoints are then sharded, see `lmforge convert
            sharded`).
        activation_checkpointing: Recompute each block's activations in the backward pass instead of storing
            them: activation memory of one block, for about a third more compute.
        cpu_offload: With fsdp on GPUs: keep the sharded parameters and optimizer state in CPU memory.
        memory_limit: Memory per process, e.g. 24GB: a run whose planned peak (`lmforge plan`) exceeds it is
            refused before its first step. On a GPU its memory is the default, with a warning instead.
    """

    max_steps: int | None = None
    max_tokens: int | None = None
    max_minutes: float | None = None
    epochs: float | None = None
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    lr_decay_steps: int | None = None
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    optimizer: Literal["adamw", "adam", "rmsprop", "sgd"] = "adamw"
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float | None = 1.0
    precision: Precision | None = None
    eval_every: int = 200
    eval_batches: int = 20
    save_every: int = 500
    log_every: int = 10
    logger: Logger = "jsonl"
    seed: int = 0
    strategy: Strategy = "ddp"
    activation_checkpointing: bool = False
    cpu_offload: bool = False
    memory_limit: str | None = None

    def __post_init__(self) -> None:
        for name in ("max_steps", "max_tokens", "batch_size", "grad_accum", "eval_every", "save_every",
                     "log_every"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name}={value} must be at least 1")
        for name in ("lr", "epochs", "max_minutes"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{name}={value} must be positive")
        if self.logger not in ("jsonl", "tensorboard", "both"):
            raise ConfigError(f"logger={self.logger!r} is not one of 'jsonl', 'tensorboard', 'both'")
        if self.precision is None:
            self.precision = default_precision()
        if self.precision not in ("bf16-mixed", "32"):
            raise ConfigError(f"precision={self.precision!r} is not one of 'bf16-mixed', '32'")
        if self.strategy not in ("ddp", "fsdp"):
            raise ConfigError(f"strategy={self.strategy!r} is not one of 'ddp', 'fsdp'")

    @property
    def limited(self) -> bool:
        return any(v is not None for v in (self.max_steps, self.max_tokens, self.max_minutes, self.epochs))


def to_device(x: Tensor | dict[str, Tensor], device: torch.device) -> Tensor | dict[str, Tensor]:
    """A batch's inputs are token ids, or a dict of tensors (ids plus positions, masks, segment ids) for
    fine-tuning methods whose `loss_fn` needs more than the ids."""
    if isinstance(x, dict):
        return {k: v.to(device, non_blocking=True) for k, v in x.items()}
    return x.to(device, non_blocking=True)


@dataclass
class TrainResult:
    out: Path
    step: int
    tokens: int
    train_loss: float | None
    val_loss: float | None
    stopped_by: str


def limit_steps(cfg: TrainConfig, loader: Batches) -> tuple[int | None, int | None]:
    """The optimizer steps that `epochs` and `max_tokens` come to, from the loader's epoch (its first)."""
    per_epoch = getattr(loader, "batches_per_epoch", None)
    if cfg.epochs is not None and per_epoch is None:
        raise ConfigError(f"epochs={cfg.epochs} needs a loader that knows its batches_per_epoch")
    epoch_steps = math.ceil(cfg.epochs * per_epoch / cfg.grad_accum) if cfg.epochs is not None else None
    tokens_per_epoch = getattr(loader, "tokens_per_epoch", None)
    token_steps = None
    if cfg.max_tokens is not None and per_epoch and tokens_per_epoch:  # an estimate where batches vary
        token_steps = -(-cfg.max_tokens * per_epoch // (tokens_per_epoch * cfg.grad_accum))
    return epoch_steps, token_steps


def train(model: nn.Module, loader: Batches, out: Path, cfg: TrainConfig, *, ctx: Dist | None = None,
          val_loader: Batches | None = None, loss_fn: LossFn = lm_loss, save: SaveFn | None = None,
          state: dict[str, Any] | None = None, run_info: dict[str, Any] | None = None,
          progress: bool = True) -> TrainResult:
    """Optimise `model` on `loader` until a step, epoch, token or time limit, checkpointing into `out`.

    With a `state` (train_state.pt of the run in `out`), optimizer, data position, RNG and counters come
    from it, so the continued run takes exactly the steps the uninterrupted one would have. `save(train_state,
    step)` writes the method's files (by default the whole model as a checkpoint).
    """
    ctx = ctx or Dist()
    out = Path(out)
    ddp = wrap(model, ctx, cfg.strategy, precision=cfg.precision,  # before the optimizer: FSDP swaps parameters
               activation_checkpointing=cfg.activation_checkpointing, cpu_offload=cfg.cpu_offload)
    optimizer = build_optimizer(model, cfg.optimizer, cfg.lr, weight_decay=cfg.weight_decay,
                                betas=(cfg.beta1, cfg.beta2))
    seq_len = getattr(loader, "block_size", None) or model.config.max_position_embeddings
    flops_per_token = model.flops_per_token(seq_len) if hasattr(model, "flops_per_token") else None
    # Measured before seeding: its random matrices (drawn only by the first run in a process, it is cached)
    # must not shift the RNG stream that dropout draws from, or a run would depend on what ran before it.
    peak = measure_peak_flops(cfg.precision, ctx.device) if flops_per_token else None
    epoch_steps, token_steps = limit_steps(cfg, loader)  # before the loader's state moves it on
    step, tokens, elapsed_before = 0, 0, 0.0
    if state is not None:
        if SHARDED in state:  # model and optimizer from the DCP directory, resharded to this world size
            from lmforge.train import sharded  # torch.distributed.checkpoint: seconds to import, only when used

            sharded.load(out / state[SHARDED], model, optimizer)
        else:
            optimizer.load_state_dict(state["optimizer"])
        loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"])
        step, tokens, elapsed_before = state["step"], state["tokens"], state.get("elapsed", 0.0)
    else:
        torch.manual_seed(cfg.seed + ctx.rank)
    params = [p for p in model.parameters() if p.requires_grad]
    total_steps = min((s for s in (cfg.max_steps, epoch_steps, token_steps) if s is not None), default=None)
    cfg = shorten_warmup(cfg, total_steps, announce=ctx.is_main) if state is None else cfg
    decay_steps = cfg.lr_decay_steps or total_steps
    bar = Progress(total_steps, "train", unit="steps", enabled=progress and ctx.is_main,
                   time_limit=max(0.0, 60 * cfg.max_minutes - elapsed_before) if cfg.max_minutes else None,
                   initial=step)
    metrics = MetricsLog(out, cfg.logger, resume_step=step if state else None) if ctx.is_main else None
    saved_at = step if state is not None else None

    def write(train_state: dict[str, Any]) -> None:
        if save is not None:
            save(train_state, step)
        else:
            save_checkpoint(out, model, model.config, train_state=train_state, step=step)

    def save_now() -> None:
        nonlocal saved_at
        saved_at = step
        if cfg.strategy == "fsdp":  # every rank writes its shards; rank 0 then the run's other files
            from lmforge.train import sharded
            train_state = {"loader": loader.state_dict(), "rng": rng_state(), "tokens": tokens,
                           "elapsed": elapsed_before + time.perf_counter() - start, "decay_steps": decay_steps,
                           "train_config": dataclasses.asdict(cfg), "run": run_info or {},
                           "world_size": ctx.world_size}
            sharded.save(out, model, optimizer, step, ctx, lambda: write(train_state))
            return
        if ctx.is_main:  # ranks hold identical weights and optimizer state after each DDP step
            train_state = {"optimizer": optimizer.state_dict(), "loader": loader.state_dict(), "rng": rng_state(),
                           "tokens": tokens, "elapsed": elapsed_before + time.perf_counter() - start,
                           "decay_steps": decay_steps, "train_config": dataclasses.asdict(cfg),
                           "run": run_info or {}, "world_size": ctx.world_size}
            if save is not None:
                save(train_state, step)
            else:
                save_checkpoint(out, model, model.config, train_state=train_state, step=step)

    def log(record: dict[str, Any]) -> None:
        if metrics is not None:
            metrics.log(record)

    def log_step(totals: Tensor, lr: float, grad_norm: Tensor | None) -> None:
        nonlocal train_loss, last_time, last_tokens, logged_step
        train_loss = (totals[0] / totals[1].clamp(min=1)).item()  # the last step's mean loss per target
        now = time.perf_counter()
        tok_s = (tokens - last_tokens) / (now - last_time)
        last_time, last_tokens, logged_step = now, tokens, step
        record = {"step": step, "tokens": tokens, "loss": train_loss, "lr": lr, "tokens_per_s": tok_s,
                  "elapsed_s": elapsed_before + now - start}
        if grad_norm is not None:
            record["grad_norm"] = float(grad_norm)
        if peak:
            record["mfu"] = tok_s * flops_per_token / (peak * ctx.world_size)
        log(record)
        bar.update(step, loss=train_loss, lr=lr, **{"tok/s": round(tok_s)},
                   **({"mfu": f"{100 * record['mfu']:.1f}%"} if peak else {}))

    start = last_time = time.perf_counter()
    last_tokens, train_loss, val_loss, stopped_by, logged_step = tokens, None, None, "max_steps", step
    lr, grad_norm, totals = cfg.lr, None, torch.zeros(3, dtype=torch.float64)
    model.train()
    with _stop_on_sigint() as interrupted:
        while True:
            seconds = elapsed_before + time.perf_counter() - start  # the run's time, resumes included
            stop = "interrupted" if interrupted() else _stop_reason(cfg, step, tokens, seconds, epoch_steps)
            time_progress = seconds / (60 * cfg.max_minutes) if cfg.max_minutes and not decay_steps else -1.0
            must_stop, time_progress = from_rank0([float(stop is not None), time_progress], ctx)
            if must_stop:
                stopped_by = stop or "rank 0"
                if step > logged_step:  # the curve always ends at the last step taken
                    log_step(totals, lr, grad_norm)
                break
            lr = lr_at(step, peak=cfg.lr, warmup=cfg.warmup_steps, total=decay_steps, schedule=cfg.schedule,
                       min_ratio=cfg.min_lr_ratio, progress=time_progress if time_progress >= 0 else None)
            set_lr(optimizer, lr)
            totals = torch.zeros(3, dtype=torch.float64, device=ctx.device)  # summed loss, its targets, tokens
            step_tokens = 0
            for micro in range(cfg.grad_accum):
                x, y = loader.next_batch()
                step_tokens += int(real_tokens(x, y))  # counted on the CPU, before the copy: no device sync
                x, y = to_device(x, ctx.device), y.to(ctx.device, non_blocking=True)
                with no_sync(ddp, ctx, cfg.strategy, sync=micro == cfg.grad_accum - 1):
                    with autocast(cfg.precision, ctx.device):
                        loss_sum, count = loss_fn(ddp, x, y)
                    loss_sum.backward()
                totals[:2] += torch.stack([loss_sum.detach(), count.detach()]).double()
            totals[2] = step_tokens
            totals = all_reduce_sum(totals, ctx)
            # The step's gradient is the mean over all of its targets, however they fall into micro-batches
            # and ranks: each micro-batch added the gradient of its summed loss, DDP / FSDP averaged over ranks.
            scale = (ctx.world_size / totals[1].clamp(min=1)).float()
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(scale)
            grad_norm = clip_grad_norm(params, cfg.grad_clip) if cfg.grad_clip else None
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens += int(totals[2].item()) if ctx.enabled else step_tokens
            if step % cfg.log_every == 0 or step == total_steps:
                log_step(totals, lr, grad_norm)
            if val_loader is not None and step % cfg.eval_every == 0:
                val_loss = evaluate(model, val_loader, cfg.eval_batches, loss_fn, cfg.precision, ctx)
                log({"step": step, "tokens": tokens, "val_loss": val_loss})
                bar.update(step, force=True, val_loss=val_loss)
            if step % cfg.save_every == 0:
                save_now()
    if val_loader is not None and stopped_by != "interrupted" and (step % cfg.eval_every or val_loss is None):
        val_loss = evaluate(model, val_loader, cfg.eval_batches, loss_fn, cfg.precision, ctx)
        log({"step": step, "tokens": tokens, "val_loss": val_loss})
    if saved_at != step:
        save_now()
    bar.close()
    if metrics is not None:
        metrics.close()
    if stopped_by == "interrupted" and ctx.is_main:
        print(f"interrupted: checkpoint of step {step} saved in {out}; continue with --resume {out}", flush=True)
    return TrainResult(out, step, tokens, train_loss, val_loss, stopped_by)


def shorten_warmup(cfg: TrainConfig, total_steps: int | None, *, announce: bool = True) -> TrainConfig:
    """A warmup as long as the run (the default 100 steps of a 20-step trial) would end before the rate ever
    reached --lr: it becomes a tenth of the run, and the log says so. The shortened value is what the run saves,
    so a resumed run keeps it."""
    if not total_steps or cfg.warmup_steps < total_steps:
        return cfg
    shorter = total_steps // 10
    if announce:
        print(f"warmup_steps {cfg.warmup_steps} is not shorter than this run's {total_steps} steps (the learning "
              f"rate would never reach --lr {cfg.lr:g}); warming up over {shorter} steps, a tenth of the run",
              file=sys.stderr, flush=True)
    return dataclasses.replace(cfg, warmup_steps=shorter)


@contextlib.contextmanager
def _stop_on_sigint() -> Iterator[Callable[[], bool]]:
    """First Ctrl-C finishes the current step and saves; a second one aborts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    hits: list[int] = []

    def handler(signum: int, frame: object) -> None:
        hits.append(signum)
        if len(hits) > 1:
            raise KeyboardInterrupt
        print("\nstopping after this step (Ctrl-C again to abort without saving)", file=sys.stderr, flush=True)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: bool(hits)
    finally:
        signal.signal(signal.SIGINT, previous)


def _stop_reason(cfg: TrainConfig, step: int, tokens: int, seconds: float, epoch_steps: int | None) -> str | None:
    if cfg.max_steps is not None and step >= cfg.max_steps:
        return "max_steps"
    if epoch_steps is not None and step >= epoch_steps:
        return "epochs"
    if cfg.max_tokens is not None and tokens >= cfg.max_tokens:
        return "max_tokens"
    if cfg.max_minutes is not None and seconds >= 60 * cfg.max_minutes:
        return "max_minutes"
    return None


@torch.no_grad()
def evaluate(model: nn.Module, loader: Batches, batches: int, loss_fn: LossFn, precision: str, ctx: Dist) -> float:
    """Mean loss per target over the first `batches` batches of `loader`, the same windows every time.

    Never more than one epoch: a small val split is not scored twice over.
    """
    batches = min(batches, getattr(loader, "batches_per_epoch", batches))
    start_state = loader.state_dict()
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=ctx.device)
    try:
        for _ in range(batches):
            x, y = loader.next_batch()
            with autocast(precision, ctx.device):
                loss_sum, count = loss_fn(model, to_device(x, ctx.device), y.to(ctx.device))
            totals += torch.stack([loss_sum.float(), count.float()]).double()
    finally:
        loader.load_state_dict(start_state)
        model.train(was_training)
    totals = all_reduce_sum(totals, ctx)
    return (totals[0] / totals[1].clamp(min=1)).item()
