"""Sequence heads on a backbone: one vector per text, then a linear layer to class logits or a regression value.

The vector is, for a decoder (gpt.py), the final hidden state of the last real token — the only position
that has read the whole text under a causal mask (as GPT-1's classifier, Radford et al. 2018); for an
encoder (bert.py), the [CLS] state (Devlin et al. 2019) or the mean over real tokens (Sentence-BERT,
Reimers & Gurevych 2019). Classification trains with cross-entropy (optionally class-weighted, for
imbalanced labels), regression with mean squared error on standardized targets.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.errors import ConfigError

Pooling = Literal["last", "cls", "mean"]


@dataclass
class HeadConfig:
    """What head_config.json records: enough to rebuild the head and read its outputs."""

    task: Literal["classify", "regress"]
    labels: list[str] = field(default_factory=list)  # classify: class names in logit order
    pooling: Pooling = "last"
    dropout: float = 0.1
    max_length: int = 256
    text_field: str = "text"
    target_field: str = "label"
    target_mean: float = 0.0  # regress: the head predicts (y - mean) / std
    target_std: float = 1.0
    class_weights: list[float] | None = None

    @property
    def num_outputs(self) -> int:
        return len(self.labels) if self.task == "classify" else 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HeadConfig:
        return cls(**data)


def is_decoder(backbone: nn.Module) -> bool:
    """Decoders expose `hidden` (final normed states under a causal mask); encoders return states from forward."""
    return hasattr(backbone, "hidden")


class SequenceHead(nn.Module):
    """backbone → pooled vector → dropout → Linear(hidden, outputs)."""

    def __init__(self, backbone: nn.Module, config: HeadConfig) -> None:
        super().__init__()
        if is_decoder(backbone) and config.pooling == "cls":
            raise ConfigError("pooling='cls' needs an encoder: a decoder's first token sees nothing after it; "
                              "use 'last' (or 'mean')")
        if not is_decoder(backbone) and config.pooling == "last":
            raise ConfigError("pooling='last' is for decoders; an encoder pools with 'cls' or 'mean'")
        self.backbone, self.config = backbone, config
        self.dropout = nn.Dropout(config.dropout)
        hidden = backbone.config.hidden_size
        self.score = nn.Linear(hidden, config.num_outputs)
        nn.init.normal_(self.score.weight, std=0.02)
        nn.init.zeros_(self.score.bias)

    def pooled(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """[B, hidden] from right-padded ids [B, T] and their padding mask (1 = real token)."""
        if is_decoder(self.backbone):
            states = self.backbone.hidden(input_ids, attention_mask=attention_mask)
        else:
            states = self.backbone(input_ids, attention_mask=attention_mask)
        if self.config.pooling == "last":
            last = attention_mask.long().sum(dim=1) - 1
            return states[torch.arange(states.shape[0], device=states.device), last]
        if self.config.pooling == "cls":
            return states[:, 0]
        weights = attention_mask[..., None].to(states.dtype)
        return (states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Logits [B, classes], or standardized predictions [B, 1] for regression."""
        return self.score(self.dropout(self.pooled(input_ids, attention_mask)))


def head_loss(model: nn.Module, x: dict[str, Tensor], y: Tensor, *, task: str,
              class_weights: Tensor | None = None) -> Tensor:
    """Cross-entropy (classify, optionally class-weighted) or mean squared error (regress) of a SequenceHead."""
    out = model(x["input_ids"], x["attention_mask"]).float()
    if task == "classify":
        weight = class_weights.to(out.device) if class_weights is not None else None
        return F.cross_entropy(out, y, weight=weight)
    return F.mse_loss(out[:, 0], y.float())
