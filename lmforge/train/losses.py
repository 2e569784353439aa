"""Losses, in one place: next-token cross-entropy (pretraining), SFT over packed windows, and distillation.

Every loss the loop calls returns (summed loss, how many targets it sums). The loop divides the
accumulated gradient by the targets of the whole optimizer step, across micro-batches and ranks, so
a step is the mean over its targets however they fall into micro-batches: averaging per micro-batch
would give a short example's tokens more weight than a long one's. Targets equal to IGNORE_INDEX cost
nothing, which is how SFT trains on assistant tokens only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.model.gpt import causal_mask

IGNORE_INDEX = -100


def token_loss(logits: Tensor, y: Tensor, label_smoothing: float = 0.0) -> tuple[Tensor, Tensor]:
    """Summed cross-entropy over the targets that are not IGNORE_INDEX, and their count.

    With `label_smoothing` ε the target distribution is (1 − ε)·one-hot + ε/V (Szegedy et al. 2016; the
    Transformer trains with ε = 0.1, Vaswani et al. 2017): the model is not pushed to infinite logits.
    """
    loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE_INDEX, reduction="sum",
                           label_smoothing=label_smoothing)
    return loss, (y != IGNORE_INDEX).sum()


def lm_loss(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Next-token cross-entropy on contiguous windows (every position is a target)."""
    return token_loss(model(x), y)


def seq2seq_loss(model: nn.Module, x: dict[str, Tensor], y: Tensor) -> tuple[Tensor, Tensor]:
    """Teacher-forced cross-entropy of an encoder-decoder over the real target tokens (padding is IGNORE_INDEX).

    Label smoothing (the model config's `label_smoothing`) applies while training only: the validation loss
    stays the plain cross-entropy, comparable across runs and with the log-perplexity.
    """
    smoothing = getattr(getattr(model, "module", model).config, "label_smoothing", 0.0) if model.training else 0.0
    return token_loss(model(x["src"], x["src_mask"], x["tgt_in"]), y, smoothing)


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


def distillation_loss(student: Tensor, teacher: Tensor, y: Tensor, *, temperature: float = 2.0, alpha: float = 0.5,
                      reverse: bool = False) -> tuple[Tensor, Tensor]:
    """α·T²·KL(p_teacher ‖ p_student) + (1 − α)·CE(student, y), summed over the targets, and their count.

    Knowledge distillation (Hinton et al. 2015): both distributions are softened, p = softmax(logits / T), so the
    student also learns how the teacher ranks the wrong tokens; the T² keeps the soft term's gradients on the
    scale of the hard term's whatever T is. Forward KL makes the student cover all of the teacher's mass;
    `reverse` uses KL(p_student ‖ p_teacher), which seeks the teacher's modes (MiniLLM, Gu et al. 2024).
    """
    keep = y != IGNORE_INDEX
    log_s = F.log_softmax(student[keep].float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher[keep].float() / temperature, dim=-1)
    p, log_p, log_q = (log_s.exp(), log_s, log_t) if reverse else (log_t.exp(), log_t, log_s)
    kl = (p * (log_p - log_q)).sum()  # KL(p ‖ q) = Σ p·(log p − log q)
    ce, count = token_loss(student, y)
    return alpha * temperature ** 2 * kl + (1 - alpha) * ce, count


def distill_loss(teacher: nn.Module, *, temperature: float = 2.0, alpha: float = 0.5, reverse: bool = False
                 ) -> Callable[[nn.Module, Tensor, Tensor], tuple[Tensor, Tensor]]:
    """The loop's loss for distillation: the frozen teacher's logits computed on the fly for each batch."""

    def loss(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            teacher_logits = teacher(x)
        return distillation_loss(model(x), teacher_logits, y, temperature=temperature, alpha=alpha, reverse=reverse)

    return loss
