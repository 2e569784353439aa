"""Model configuration: one dataclass that spans the GPT-2 and Llama families, and a small preset table.

Field names follow Hugging Face's `config.json` where a key exists (hidden_size, num_hidden_layers, ...),
so a checkpoint's config reads the same to a person who knows transformers.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lmforge.errors import ConfigError

CHOICES = {
    "norm": ("layernorm", "rmsnorm"),
    "mlp": ("gelu", "gelu_tanh", "swiglu", "relu", "silu", "geglu"),  # the last three: encoder-decoders
    "position": ("learned", "rope"),
    "init": ("normal", "xavier", "he"),
}


@dataclass
class ModelConfig:
    """Shape and architecture of a decoder-only Transformer.

    GPT-2 (Radford et al. 2019): learned positions, LayerNorm, GELU MLP, biases, tied embeddings.
    Llama (Touvron et al. 2023): RoPE, RMSNorm, SwiGLU, grouped-query attention, untied head.
    Qwen2 adds a bias on q/k/v (`qkv_bias`); Qwen3 adds RMSNorm on per-head q and k (`qk_norm`).
    """

    vocab_size: int = 8192
    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None  # None = num_attention_heads (multi-head attention)
    head_dim: int | None = None  # None = hidden_size // num_attention_heads
    intermediate_size: int | None = None  # None = 4·hidden (GELU) or the Llama rounding of 8/3·hidden (SwiGLU)
    max_position_embeddings: int = 256
    norm: Literal["layernorm", "rmsnorm"] = "rmsnorm"
    norm_eps: float = 1e-5
    mlp: Literal["gelu", "gelu_tanh", "swiglu"] = "swiglu"  # gelu_tanh = GPT-2's "gelu_new" approximation
    position: Literal["learned", "rope"] = "rope"
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "linear"|"llama3", "factor": ..., ...} (Llama 3.1)
    sliding_window: int | None = None  # attend to the last this-many positions only (Mistral)
    bias: bool = False  # bias on every Linear and norm (GPT-2)
    qkv_bias: bool = False  # bias on the q/k/v projection only (Qwen2)
    qk_norm: bool = False  # RMSNorm over each head's q and k before RoPE (Qwen3)
    tie_word_embeddings: bool = False
    init: Literal["normal", "xavier", "he"] = "normal"
    initializer_range: float = 0.02
    dropout: float = 0.0
    family: str = "llama"  # the published architecture this shape follows; `convert to-hf` exports as it

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "intermediate_size", "max_position_embeddings"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name}={value} must be at least 1")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"hidden_size={self.hidden_size} is not divisible by "
                    f"num_attention_heads={self.num_attention_heads}"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.intermediate_size is None:
            if self.mlp != "swiglu":
                self.intermediate_size = 4 * self.hidden_size
            else:  # Llama: 2/3 of 4·hidden so SwiGLU's three matrices cost what GELU's two do, rounded up
                self.intermediate_size = 256 * ((8 * self.hidden_size // 3 + 255) // 256)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.rope_scaling and self.rope_scaling.get("rope_type", self.rope_scaling.get("type")) not in (
                "linear", "llama3"):
            raise ConfigError(f"rope_scaling={self.rope_scaling} is not supported; rope_type 'linear' or 'llama3'")
        if self.head_dim % 2 and self.position == "rope":
            raise ConfigError(f"head_dim={self.head_dim} must be even for RoPE")
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}={getattr(self, name)!r} is not one of {allowed}")

    def to_dict(self) -> dict[str, Any]:
        return {"architectures": ["LMForgeGPT"], "model_type": "lmforge", **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> ModelConfig:
        return config_from_dict(cls, data, source)

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        data = read_config_json(path)
        if data.get("model_type", "lmforge") != "lmforge":
            raise ConfigError(
                f"{path}: model_type={data['model_type']!r} is a Hugging Face config; "
                "import it with `lmforge convert from-hf` first"
            )
        return cls.from_dict(data, source=str(path))

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def read_config_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


def config_from_dict(cls: type, data: dict[str, Any], source: str = "config") -> Any:
    """A config dataclass from a config.json's keys; an unknown key is an error naming it and the known ones."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known - {"architectures", "model_type", "torch_dtype"})
    if unknown:
        raise ConfigError(f"{source}: unknown model config keys {unknown}; known keys: {sorted(known)}")
    return cls(**{k: v for k, v in data.items() if k in known})


_GPT2 = dict(norm="layernorm", mlp="gelu_tanh", position="learned", bias=True, tie_word_embeddings=True, family="gpt2")
_LLAMA = dict(norm="rmsnorm", mlp="swiglu", position="rope", family="llama")

# A dozen shapes, not a registry: tiny ones for tests and the demo, real ones so imports fit later.
PRESETS: dict[str, dict[str, Any]] = {
    "gpt2-tiny": dict(_GPT2, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256),
    "llama-tiny": dict(_LLAMA, hidden_size=256, num_hidden_layers=6, num_attention_heads=8,
                       num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=True),
    "qwen3-tiny": dict(_LLAMA, family="qwen3", hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, qk_norm=True, max_position_embeddings=256, rope_theta=1e6),
    # nanoGPT's nn.GELU() is exact erf GELU, which is also ~4x cheaper than the tanh form on CPU
    "nanogpt-shakespeare": dict(_GPT2, mlp="gelu", vocab_size=65, hidden_size=384, num_hidden_layers=6,
                                num_attention_heads=6, max_position_embeddings=256),
    "gpt2": dict(_GPT2, vocab_size=50257, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 max_position_embeddings=1024),
    "gpt2-medium": dict(_GPT2, vocab_size=50257, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                        max_position_embeddings=1024),
    "llama-3.2-1b": dict(_LLAMA, vocab_size=128256, hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, intermediate_size=8192, max_position_embeddings=131072,
                         rope_theta=500000.0, tie_word_embeddings=True, norm_eps=1e-5),
    "qwen2.5-0.5b": dict(_LLAMA, family="qwen2", vocab_size=151936, hidden_size=896, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, intermediate_size=4864,
                         max_position_embeddings=32768, rope_theta=1000000.0, qkv_bias=True,
                         tie_word_embeddings=True, norm_eps=1e-6),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A named shape with optional overrides, e.g. `preset("llama-tiny", vocab_size=tok.vocab_size)`."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; presets: {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})
