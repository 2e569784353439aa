"""Optimizers and learning-rate schedules.

Weight decay applies to matrices (embeddings included) only: pulling norm scales and biases toward
zero only hurts (nanoGPT's parameter groups).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from lmforge.errors import ConfigError

OptimizerName = Literal["adamw", "adam", "rmsprop", "sgd"]
ScheduleName = Literal["cosine", "linear", "constant"]


def build_optimizer(model: nn.Module, name: OptimizerName = "adamw", lr: float = 3e-4, *,
                    weight_decay: float = 0.1, betas: tuple[float, float] = (0.9, 0.95),
                    momentum: float = 0.9, eps: float = 1e-8) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters")
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # One fused kernel per step instead of a dozen elementwise passes: 4x faster than foreach on this CPU
    # (40 → 10 ms for 10.8M parameters), about 3% of a nanoGPT-sized training step.
    fused = {"fused": True} if all(p.device.type in ("cpu", "cuda") for p in params) else {}
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **fused)
    if name == "adam":  # L2 penalty in the gradient, the original Kingma & Ba 2015 formulation
        return torch.optim.Adam(groups, lr=lr, betas=betas, eps=eps, **fused)
    if name == "rmsprop":
        return torch.optim.RMSprop(groups, lr=lr, alpha=0.99, eps=eps, momentum=momentum)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0)
    raise ConfigError(f"optimizer={name!r} is not one of adamw, adam, rmsprop, sgd")


def lr_at(step: int, *, peak: float, warmup: int, total: int | None, schedule: ScheduleName = "cosine",
          min_ratio: float = 0.1, progress: float | None = None) -> float:
    """Linear warmup to `peak`, then decay to `min_ratio·peak` at `total` steps (constant past it).

    A run bounded by time rather than steps passes `progress`, the fraction of its time budget used,
    and decays over that instead; with neither, the rate stays at peak after warmup.
    """
    if warmup and step < warmup:
        return peak * (step + 1) / warmup
    if progress is None and total and total > warmup:
        progress = (step - warmup) / (total - warmup)
    if schedule == "constant" or progress is None:
        return peak
    progress = min(1.0, progress)
    if schedule == "linear":
        return peak * (1.0 - (1.0 - min_ratio) * progress)
    if schedule == "cosine":  # Loshchilov & Hutter 2017, without restarts
        return peak * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))
    raise ConfigError(f"schedule={schedule!r} is not one of cosine, linear, constant")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
