"""Losses, in one place: next-token cross-entropy (pretraining) and SFT over packed windows.

Every loss the loop calls returns (summed loss, how many targets it sums). The loop divides the
accumulated gradient by the targets of the whole optimizer step, across micro-batches and ranks, so
a step is the mean over its targets however they fall into micro-batches: averaging per micro-batch
would give a short example's tokens more weight than a long one's. Targets equal to IGNORE_INDEX cost
nothing, which is how SFT trains on assistant tokens only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.model.gpt import causal_mask

IGNORE_INDEX = -100


def token_loss(logits: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Summed cross-entropy over the targets that are not IGNORE_INDEX, and their count."""
    loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, (y != IGNORE_INDEX).sum()


def lm_loss(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Next-token cross-entropy on contiguous windows (every position is a target)."""
    return token_loss(model(x), y)


def block_diagonal_mask(segments: Tensor, window: int | None = None) -> Tensor:
    """[B, 1, T, T] (True = attend): causal within each example (segment id > 0), nothing across examples.

    With a sliding `window` (Mistral) a query sees only the last `window` positions of its own example,
    as it would alone. Padding (segment 0) attends only to itself, so no softmax row is empty (NaN).
    """
    same = segments[:, :, None] == segments[:, None, :]
    index = torch.arange(segments.shape[1], device=segments.device)
    causal = causal_mask(index[:, None], index[None, :], window)
    real = (segments > 0)[:, :, None]
    return ((same & causal & real) | (index[:, None] == index[None, :]))[:, None]


def sft_loss(model: nn.Module, x: dict[str, Tensor], y: Tensor) -> tuple[Tensor, Tensor]:
    """Cross-entropy over the assistant tokens of packed windows (position resets + block-diagonal mask)."""
    window = getattr(getattr(model, "module", model).config, "sliding_window", None)  # `module`: under DDP
    mask = block_diagonal_mask(x["segments"], window)
    return token_loss(model(x["input_ids"], positions=x["positions"], attention_mask=mask), y)
