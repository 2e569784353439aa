"""An LSTM language model: the recurrent baseline the Transformer replaced.

embedding → stacked LSTM (Hochreiter & Schmidhuber 1997) → output layer tied to the embedding, as in
Zaremba et al. (2014) with the weight tying of Press & Wolf (2017) and Inan et al. (2017): the vocabulary
matrix is learned once, so the same budget buys a wider LSTM. Dropout between layers and before the output
(Zaremba et al.), none by default like the Transformer presets.

It trains in the one loop like any model: `forward(ids [B, T])` returns logits [B, T, V], each window
starting from a zero state (truncated backpropagation through time over the loader's windows). It keeps no KV
cache; the engine decodes it by recomputing the recurrence over the tokens so far (`lmforge.infer.recompute`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from lmforge.config import config_from_dict, read_config_json
from lmforge.errors import ConfigError

LSTM_MODEL_TYPE = "lmforge-lstm"


@dataclass
class LSTMConfig:
    """Shape of an LSTM language model. max_position_embeddings is the training window and the longest
    sequence the engine decodes (an LSTM has no position table; it is where its training stopped looking)."""

    vocab_size: int = 8192
    hidden_size: int = 256  # embedding width = LSTM width, so the output can share the embedding matrix
    num_hidden_layers: int = 2
    dropout: float = 0.0
    max_position_embeddings: int = 256
    family: str = "lstm"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be at least 1")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout={self.dropout} must be in [0, 1)")

    def to_dict(self) -> dict[str, Any]:
        return {"architectures": ["LMForgeLSTM"], "model_type": LSTM_MODEL_TYPE, **dataclasses.asdict(self)}

    @classmethod
    def load(cls, path: str | Path) -> LSTMConfig:
        return config_from_dict(cls, read_config_json(Path(path)), str(path))

    def replace(self, **changes: Any) -> LSTMConfig:
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ConfigError(f"an LSTM model has no {', '.join(unknown)} (known: "
                              f"{', '.join(f.name for f in dataclasses.fields(self))})")
        return dataclasses.replace(self, **changes)


# Two sizes: one for tests and quick comparisons, one near Zaremba et al.'s "medium" (650 wide, 2 layers).
LSTM_PRESETS: dict[str, dict[str, Any]] = {
    "lstm-tiny": dict(hidden_size=128, num_hidden_layers=1),
    "lstm-small": dict(hidden_size=512, num_hidden_layers=2),
}


def lstm_preset(name: str, **overrides: Any) -> LSTMConfig:
    if name not in LSTM_PRESETS:
        raise ConfigError(f"unknown LSTM preset {name!r}; presets: {', '.join(LSTM_PRESETS)}")
    return LSTMConfig(**LSTM_PRESETS[name]).replace(**overrides)


class LSTMLM(nn.Module):
    """Tied-embedding LSTM language model; see the module docstring."""

    kv_cache = False  # decoded by recomputing from the token history (lmforge.infer.recompute)

    def __init__(self, config: LSTMConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.lstm = nn.LSTM(config.hidden_size, config.hidden_size, config.num_hidden_layers, batch_first=True,
                            dropout=config.dropout if config.num_hidden_layers > 1 else 0.0)
        self.drop = nn.Dropout(config.dropout)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.lm_head.weight = self.embed.weight
        # Zaremba et al. / PyTorch's word_language_model: U(−0.1, 0.1) for the shared matrix (N(0, 1), the
        # Embedding default, would make the tied output's first logits huge); the LSTM keeps U(±1/√hidden).
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)

    def forward(self, idx: Tensor, cache: Any = None, **_: Any) -> Tensor:
        out, _ = self.lstm(self.drop(self.embed(idx)))
        return self.lm_head(self.drop(out))

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if exclude_embeddings else n
