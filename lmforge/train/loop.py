"""The one training loop. Pretraining and every fine-tuning method run through `train`.

Methods differ by what they hand in: the batches (a loader with `next_batch`/`state_dict`), the loss
(`loss_fn`, cross-entropy with ignore_index by default, so masked tokens cost nothing), and which
parameters have `requires_grad` — never by a copy of this loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from lmforge.config import ModelConfig
from lmforge.errors import ConfigError
from lmforge.io import atomic_write_text
from lmforge.progress import Progress
from lmforge.train.checkpoint import load_train_state, rng_state, save_checkpoint, set_rng_state
from lmforge.train.distributed import Dist, all_reduce_mean, from_rank0
from lmforge.train.optim import build_optimizer, lr_at, set_lr
from lmforge.train.precision import autocast, default_precision, measure_peak_flops

IGNORE_INDEX = -100
Precision = Literal["bf16-mixed", "32"]


class Batches(Protocol):
    def next_batch(self) -> tuple[Tensor | dict[str, Tensor], Tensor]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class TrainConfig:
    """Settings of one run; saved in train_state.pt so `--resume` continues with the same ones."""

    max_steps: int | None = None
    max_tokens: int | None = None
    max_minutes: float | None = None
    batch_size: int = 8  # windows per micro-batch per process
    grad_accum: int = 1
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    lr_decay_steps: int | None = None  # None = max_steps, or the time budget of a max_minutes run
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
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_steps is None and self.max_tokens is None and self.max_minutes is None:
            raise ConfigError("set at least one of max_steps, max_tokens or max_minutes")
        for name in ("max_steps", "max_tokens", "batch_size", "grad_accum", "eval_every", "save_every",
                     "log_every"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name}={value} must be at least 1")
        if self.lr <= 0:
            raise ConfigError(f"lr={self.lr} must be positive")
        if self.precision is None:
            self.precision = default_precision()
        if self.precision not in ("bf16-mixed", "32"):
            raise ConfigError(f"precision={self.precision!r} is not one of 'bf16-mixed', '32'")


def to_device(x: Tensor | dict[str, Tensor], device: torch.device) -> Tensor | dict[str, Tensor]:
    """A batch's inputs are token ids, or a dict of tensors (ids plus positions, masks, segment ids) for
    fine-tuning methods whose `loss_fn` needs more than the ids."""
    if isinstance(x, dict):
        return {k: v.to(device, non_blocking=True) for k, v in x.items()}
    return x.to(device, non_blocking=True)


def lm_loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Mean next-token cross-entropy over targets that are not IGNORE_INDEX."""
    logits = model(x)
    return F.cross_entropy(logits.view(-1, logits.size(-1)).float(), y.view(-1), ignore_index=IGNORE_INDEX)


@dataclass
class TrainResult:
    out: Path
    step: int
    tokens: int
    train_loss: float | None
    val_loss: float | None
    stopped_by: str


def train(model: nn.Module, model_config: ModelConfig, loader: Batches, out: Path, cfg: TrainConfig, *,
          ctx: Dist | None = None, val_loader: Batches | None = None,
          loss_fn: Callable[[nn.Module, Tensor, Tensor], Tensor] = lm_loss, tokenizer_dir: Path | None = None,
          generation_config: dict[str, Any] | None = None, resume: bool = False,
          run_info: dict[str, Any] | None = None, progress: bool = True,
          save_fn: Callable[[dict[str, Any], int], None] | None = None,
          load_state_fn: Callable[[Path], dict[str, Any]] | None = None) -> TrainResult:
    """Optimise `model` on `loader` until a step, token or time limit, checkpointing into `out`.

    With `resume`, optimizer, data position, RNG and counters come from `out/train_state.pt`, so the
    continued run takes exactly the steps the uninterrupted one would have. Methods that save other
    files than a whole model (LoRA saves its adapters alone) pass `save_fn(train_state, step)` and the
    matching `load_state_fn(out)`; by default the whole model goes to model.safetensors.
    """
    ctx = ctx or Dist()
    out = Path(out)
    model.to(ctx.device)
    optimizer = build_optimizer(model, cfg.optimizer, cfg.lr, weight_decay=cfg.weight_decay,
                                betas=(cfg.beta1, cfg.beta2))
    seq_len = getattr(loader, "block_size", model_config.max_position_embeddings)
    flops_per_token = model.flops_per_token(seq_len) if hasattr(model, "flops_per_token") else None
    # Measured before seeding: its random matrices (drawn only by the first run in a process, it is cached)
    # must not shift the RNG stream that dropout draws from, or a run would depend on what ran before it.
    peak = measure_peak_flops(cfg.precision, ctx.device) if flops_per_token else None
    step, tokens, elapsed_before = 0, 0, 0.0
    if resume:
        state = (load_state_fn or load_train_state)(out)
        optimizer.load_state_dict(state["optimizer"])
        loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"])
        step, tokens, elapsed_before = state["step"], state["tokens"], state.get("elapsed", 0.0)
        if ctx.is_main:
            _truncate_metrics(out / "metrics.jsonl", step)
    else:
        torch.manual_seed(cfg.seed + ctx.rank)
    ddp = DistributedDataParallel(model) if ctx.enabled else model
    tokens_per_step = cfg.batch_size * cfg.grad_accum * seq_len * ctx.world_size
    total_steps = cfg.max_steps
    if total_steps is None and cfg.max_tokens is not None:
        total_steps = -(-cfg.max_tokens // tokens_per_step)
    decay_steps = cfg.lr_decay_steps or total_steps
    bar = Progress(total_steps, "train", unit="steps", enabled=progress and ctx.is_main,
                   time_limit=60 * cfg.max_minutes if cfg.max_minutes else None)
    metrics = open(out / "metrics.jsonl", "a") if ctx.is_main else None  # noqa: SIM115 (closed below)

    def save() -> None:
        if ctx.is_main:  # ranks hold identical weights and optimizer state after each DDP step
            state = {"optimizer": optimizer.state_dict(), "loader": loader.state_dict(), "rng": rng_state(),
                     "tokens": tokens, "elapsed": elapsed_before + time.perf_counter() - start,
                     "train_config": dataclasses.asdict(cfg), "run": run_info or {}}
            if save_fn is not None:
                save_fn(state, step)
                return
            save_checkpoint(out, model, model_config, tokenizer_dir=tokenizer_dir,
                            generation_config=generation_config, train_state=state, step=step)

    def log(record: dict[str, Any]) -> None:
        if metrics is not None:
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()

    def log_step(loss_sum: Tensor, lr: float, grad_norm: Tensor | None) -> None:
        nonlocal train_loss, last_time, last_tokens, logged_step
        train_loss = all_reduce_mean(loss_sum / cfg.grad_accum, ctx).item()
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
    loss_sum, lr, grad_norm = torch.zeros((), device=ctx.device), cfg.lr, None
    model.train()
    with _stop_on_sigint() as interrupted:
        while True:
            seconds = time.perf_counter() - start
            stop = "interrupted" if interrupted() else _stop_reason(cfg, step, tokens, seconds)
            time_progress = seconds / (60 * cfg.max_minutes) if cfg.max_minutes and not decay_steps else -1.0
            must_stop, time_progress = from_rank0([float(stop is not None), time_progress], ctx)
            if must_stop:
                stopped_by = stop or "rank 0"
                if step > logged_step:  # the curve always ends at the last step taken
                    log_step(loss_sum, lr, grad_norm)
                break
            lr = lr_at(step, peak=cfg.lr, warmup=cfg.warmup_steps, total=decay_steps, schedule=cfg.schedule,
                       min_ratio=cfg.min_lr_ratio, progress=time_progress if time_progress >= 0 else None)
            set_lr(optimizer, lr)
            loss_sum = torch.zeros((), device=ctx.device)
            for micro in range(cfg.grad_accum):
                x, y = loader.next_batch()
                x, y = to_device(x, ctx.device), y.to(ctx.device, non_blocking=True)
                sync = contextlib.nullcontext() if not ctx.enabled or micro == cfg.grad_accum - 1 else ddp.no_sync()
                with sync:
                    with autocast(cfg.precision, ctx.device):
                        loss = loss_fn(ddp, x, y)
                    (loss / cfg.grad_accum).backward()
                loss_sum += loss.detach()
            grad_norm = (torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                         if cfg.grad_clip else None)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens += tokens_per_step
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                log_step(loss_sum, lr, grad_norm)
            if val_loader is not None and step % cfg.eval_every == 0:
                val_loss = evaluate(model, val_loader, cfg.eval_batches, loss_fn, cfg.precision, ctx)
                log({"step": step, "tokens": tokens, "val_loss": val_loss})
                bar.update(step, force=True, val_loss=val_loss)
            if step % cfg.save_every == 0:
                save()
    if val_loader is not None and stopped_by != "interrupted" and (step % cfg.eval_every or val_loss is None):
        val_loss = evaluate(model, val_loader, cfg.eval_batches, loss_fn, cfg.precision, ctx)
        log({"step": step, "tokens": tokens, "val_loss": val_loss})
    if step % cfg.save_every or not (out / "model.safetensors").exists():
        save()
    bar.close()
    if metrics is not None:
        metrics.close()
    if stopped_by == "interrupted" and ctx.is_main:
        print(f"interrupted: checkpoint of step {step} saved in {out}; continue with --resume {out}", flush=True)
    return TrainResult(out, step, tokens, train_loss, val_loss, stopped_by)


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


def _stop_reason(cfg: TrainConfig, step: int, tokens: int, seconds: float) -> str | None:
    if cfg.max_steps is not None and step >= cfg.max_steps:
        return "max_steps"
    if cfg.max_tokens is not None and tokens >= cfg.max_tokens:
        return "max_tokens"
    if cfg.max_minutes is not None and seconds >= 60 * cfg.max_minutes:
        return "max_minutes"
    return None


@torch.no_grad()
def evaluate(model: nn.Module, loader: Batches, batches: int, loss_fn: Callable, precision: str,
             ctx: Dist) -> float:
    """Mean loss over the first `batches` batches of `loader`, the same windows every time.

    Never more than one epoch: a small val split is not scored twice over.
    """
    batches = min(batches, getattr(loader, "batches_per_epoch", batches))
    start_state = loader.state_dict()
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=ctx.device)
    try:
        for _ in range(batches):
            x, y = loader.next_batch()
            with autocast(precision, ctx.device):
                total += loss_fn(model, to_device(x, ctx.device), y.to(ctx.device)).float()
    finally:
        loader.load_state_dict(start_state)
        model.train(was_training)
    return all_reduce_mean(total / batches, ctx).item()


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop lines logged after the checkpoint we resume from, so the curve has no doubled steps."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))
