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
from lmforge.tokenizer import Tokenizer

Pooling = Literal["last", "cls", "mean"]


@dataclass
class HeadConfig:
    """What head_config.json records: enough to rebuild the head and read its outputs."""

    task: Literal["classify", "regress", "qa"]  # qa: a start/end span head (`SpanHead`)
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
        return len(self.labels) if self.task == "classify" else 2 if self.task == "qa" else 1

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


class SpanHead(nn.Module):
    """Extractive question answering (Devlin et al. 2019, §4.2): an encoder reads "[CLS] question [SEP] context
    [SEP]" and one Linear(hidden, 2) scores every token as the answer's start and its end; the answer is the
    span with the highest start + end score. Named `score` like SequenceHead's layer, so both save alike; it
    holds the same numbers as Hugging Face's `qa_outputs` in BertForQuestionAnswering."""

    def __init__(self, backbone: nn.Module, config: HeadConfig) -> None:
        super().__init__()
        if is_decoder(backbone):
            raise ConfigError("a span (qa) head needs an encoder that reads the context both ways (BERT / MiniLM); "
                              "this backbone is a decoder")
        self.backbone, self.config = backbone, config
        self.dropout = nn.Dropout(config.dropout)
        self.score = nn.Linear(backbone.config.hidden_size, 2)
        nn.init.normal_(self.score.weight, std=0.02)
        nn.init.zeros_(self.score.bias)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        """Start and end logits [B, T, 2] for right-padded question/context pairs."""
        states = self.backbone(input_ids, token_type_ids, attention_mask)
        return self.score(self.dropout(states))


def pair_token_types(input_ids: Tensor, attention_mask: Tensor, sep_id: int) -> Tensor:
    """BERT's segment ids for "[CLS] A [SEP] B [SEP]" rows: 0 up to and including the first [SEP], 1 after it,
    0 on padding (what the tokenizer's pair template gives), for batches that carry only ids and a mask."""
    sep = (input_ids == sep_id).long()
    return ((sep.cumsum(dim=1) - sep) >= 1).long() * attention_mask.long()


def encode_texts(tokenizer: Tokenizer, texts: list[str], max_length: int, encoder: bool) -> list[list[int]]:
    """Encoders get the tokenizer's own framing ([CLS] … [SEP]); decoders end each text with eos, the
    position whose state the head reads. Cut to `max_length`, keeping the closing token."""
    if encoder:
        ids = [e.ids for e in tokenizer.hf.encode_batch(texts, add_special_tokens=True)]
    else:
        close = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
        ids = [t + close for t in tokenizer.encode_batch(texts)]
    return [t if len(t) <= max_length else t[:max_length - 1] + t[-1:] for t in ids]


def pad_id(tokenizer: Tokenizer) -> int:
    return next(i for i in (tokenizer.pad_id, tokenizer.eos_id, 0) if i is not None)


def pad_batch(ids: list[list[int]], pad: int) -> dict[str, Tensor]:
    """Right-padded input_ids [B, T] and attention_mask (1 = real token) for texts of different lengths."""
    width = max(len(t) for t in ids)
    input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for r, t in enumerate(ids):
        input_ids[r, :len(t)] = torch.tensor(t, dtype=torch.long)
        mask[r, :len(t)] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


@torch.no_grad()
def predict_texts(net: SequenceHead, tokenizer: Tokenizer, texts: list[str], batch_size: int = 32) -> Tensor:
    """Head outputs [N, classes] (logits) or [N, 1] (standardized regression) for texts, in batches.

    The one path from texts to head outputs: `predict`, evaluation and `data annotate` all call it, so they
    can never disagree about tokenisation, truncation or pooling.
    """
    net.eval()
    device = next(net.parameters()).device
    max_length = min(net.config.max_length, net.backbone.config.max_position_embeddings)
    ids = encode_texts(tokenizer, texts, max_length, not is_decoder(net.backbone))
    outputs = []
    for start in range(0, len(ids), batch_size):
        batch = pad_batch(ids[start:start + batch_size], pad_id(tokenizer))
        outputs.append(net(batch["input_ids"].to(device), batch["attention_mask"].to(device)).float().cpu())
    return torch.cat(outputs) if outputs else torch.zeros(0, net.config.num_outputs)


def head_loss(model: nn.Module, x: dict[str, Tensor], y: Tensor, *, task: str,
              class_weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Summed cross-entropy (classify, optionally class-weighted) or squared error (regress) of a SequenceHead,
    and what the sum is to be divided by: Σ w_y over the examples, their count when unweighted (the training
    loop divides once per optimizer step, so a weighted mean spans all its micro-batches)."""
    out = model(x["input_ids"], x["attention_mask"]).float()
    if task == "classify":
        if class_weights is None:
            return F.cross_entropy(out, y, reduction="sum"), torch.tensor(len(y), device=out.device)
        weight = class_weights.to(out.device)
        return F.cross_entropy(out, y, weight=weight, reduction="sum"), weight[y].sum()
    return F.mse_loss(out[:, 0], y.float(), reduction="sum"), torch.tensor(len(y), device=out.device)
