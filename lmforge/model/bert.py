"""A bidirectional Transformer encoder: BERT (Devlin et al. 2019), and so MiniLM and its sentence embedders.

Unlike the decoder in gpt.py: every token sees every other real token (no causal mask), token-type
(segment) embeddings are added to the input, and the norm comes *after* each residual sum (post-LN,
as in Vaswani et al. 2017). An encoder produces hidden states, which a pooling turns into one vector
per text: the [CLS] position, or the mean over real tokens (what sentence-transformers uses).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.config import config_from_dict, read_config_json
from lmforge.errors import ConfigError

ENCODER_MODEL_TYPE = "lmforge-encoder"


@dataclass
class EncoderConfig:
    """Shape of a BERT-style encoder; keys are those of Hugging Face's BertConfig."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int | None = None  # None = 4·hidden
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: Literal["gelu", "gelu_tanh", "relu"] = "gelu"
    pad_token_id: int = 0
    pooling: Literal["mean", "cls", "pooler"] = "mean"  # pooler = [CLS] through dense + tanh, as BERT's NSP head
    initializer_range: float = 0.02
    dropout: float = 0.0
    family: str = "bert"

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"hidden_size={self.hidden_size} is not divisible by "
                              f"num_attention_heads={self.num_attention_heads}")
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        if self.pooling not in ("mean", "cls", "pooler"):
            raise ConfigError(f"pooling={self.pooling!r} is not one of ('mean', 'cls', 'pooler')")
        if self.hidden_act not in ("gelu", "gelu_tanh", "relu"):
            raise ConfigError(f"hidden_act={self.hidden_act!r} is not one of ('gelu', 'gelu_tanh', 'relu')")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def to_dict(self) -> dict[str, Any]:
        return {"architectures": ["LMForgeEncoder"], "model_type": ENCODER_MODEL_TYPE, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> EncoderConfig:
        return config_from_dict(cls, data, source)

    @classmethod
    def load(cls, path: str | Path) -> EncoderConfig:
        return cls.from_dict(read_config_json(Path(path)), source=str(path))

    def replace(self, **changes: Any) -> EncoderConfig:
        return dataclasses.replace(self, **changes)


def activation(name: str, x: Tensor) -> Tensor:
    if name == "relu":
        return F.relu(x)
    return F.gelu(x, approximate="tanh" if name == "gelu_tanh" else "none")


class EncoderAttention(nn.Module):
    """softmax(QKᵀ/√d_k)·V over heads, every query seeing every unpadded key."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.n_head, self.head_dim = config.num_attention_heads, config.head_dim
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = config.dropout

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in self.qkv(x).split(C, dim=-1))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class EncoderMLP(nn.Module):
    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.act = config.hidden_act
        self.up = nn.Linear(config.hidden_size, config.intermediate_size)
        self.down = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(activation(self.act, self.up(x)))


class EncoderBlock(nn.Module):
    """Post-norm residual block: norm(x + attn(x)), then norm(x + mlp(x))."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.attn = EncoderAttention(config)
        self.attn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = EncoderMLP(config)
        self.mlp_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        x = self.attn_norm(x + self.dropout(self.attn(x, mask)))
        return self.mlp_norm(x + self.dropout(self.mlp(x)))


class Encoder(nn.Module):
    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.pos_embed = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.type_embed = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.embed_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(EncoderBlock(config) for _ in range(config.num_hidden_layers))
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size)
        self.apply(self._init)

    def _init(self, module: nn.Module) -> None:  # BERT: N(0, 0.02) everywhere, zero biases, unit norms
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: Tensor, token_type_ids: Tensor | None = None,
                attention_mask: Tensor | None = None) -> Tensor:
        """Hidden states [B, T, hidden] for token ids [B, T]; `attention_mask` [B, T] marks real tokens with 1."""
        T = idx.shape[1]
        if self.config.max_position_embeddings < T:
            raise ValueError(f"sequence of {T} tokens exceeds the encoder's {self.config.max_position_embeddings}")
        positions = torch.arange(T, device=idx.device)
        types = token_type_ids if token_type_ids is not None else torch.zeros_like(idx)
        x = self.dropout(self.embed_norm(self.embed(idx) + self.pos_embed(positions) + self.type_embed(types)))
        mask = attention_mask[:, None, None, :].bool() if attention_mask is not None else None
        for block in self.blocks:
            x = block(x, mask)
        return x

    def pool(self, hidden: Tensor, attention_mask: Tensor | None = None, how: str | None = None) -> Tensor:
        """One vector per sequence [B, hidden]: mean over real tokens, the [CLS] state, or BERT's pooler."""
        how = how or self.config.pooling
        if how == "cls":
            return hidden[:, 0]
        if how == "pooler":
            return torch.tanh(self.pooler(hidden[:, 0]))
        if attention_mask is None:
            return hidden.mean(dim=1)
        weights = attention_mask[..., None].to(hidden.dtype)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
