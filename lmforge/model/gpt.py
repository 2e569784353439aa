"""A decoder-only Transformer that is GPT-2, Llama, Qwen2 or Qwen3 depending on its config.

Reads top to bottom like the papers: token (and position) embeddings, N pre-norm blocks of
attention + MLP with residual connections, a final norm, and a linear head to vocabulary logits.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.config import ModelConfig
from lmforge.model.init import init_weights

# enable_gqa arrived in torch 2.5; on 2.4 we repeat K/V heads ourselves.
_SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)


def norm_layer(config: ModelConfig, dim: int) -> nn.Module:
    if config.norm == "rmsnorm":  # Zhang & Sennrich 2019: scale only, no mean subtraction
        return nn.RMSNorm(dim, eps=config.norm_eps)
    return nn.LayerNorm(dim, eps=config.norm_eps, bias=config.bias)


class Rope(nn.Module):
    """Rotary position embedding (Su et al. 2021), in the half-split layout Hugging Face checkpoints use.

    cos/sin are computed per forward from the positions (once, shared by every layer), so there is no
    table sized by the context length and any position layout (offsets, left padding, packed resets) works.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d = config.head_dim
        inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
        self.register_buffer("inv_freq", scale_rope(inv_freq, config.rope_scaling), persistent=False)

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        angles = positions[..., None].float() * self.inv_freq
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos(), angles.sin()


def scale_rope(inv_freq: Tensor, scaling: dict[str, Any] | None) -> Tensor:
    """Stretch RoPE to a longer context: "linear" (Chen et al. 2023) or "llama3" (Llama 3.1's
    wavelength-dependent scaling: long wavelengths divided by `factor`, short ones kept, a smooth ramp between)."""
    if not scaling:
        return inv_freq
    kind, factor = scaling.get("rope_type", scaling.get("type")), float(scaling["factor"])
    if kind == "linear":
        return inv_freq / factor
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    original = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    ramp = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= original / high) & (wavelen <= original / low)
    return torch.where(medium, ramp, scaled)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    if cos.dim() == 3:  # per-sequence positions [B, T, D] against x [B, H, T, D]
        cos, sin = cos[:, None], sin[:, None]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def causal_mask(q: Tensor, k: Tensor, window: int | None) -> Tensor:
    """Query position q may see key position k (broadcast): k ≤ q, and within the last `window` positions
    when attention slides (Mistral, Jiang et al. 2023)."""
    allowed = k <= q
    if window is not None:
        allowed = allowed & (k > q - window)
    return allowed


def build_mask(T: int, start: int, padding: Tensor | None, window: int | None,
                   device: torch.device) -> Tensor | None:
    """Which keys each query may see, [B|1, 1, T, start+T] (True = attend); None when plain causal will do.

    Causal, limited to the last `window` positions when sliding (Mistral), minus padded keys. Every
    query may always see itself, so a padding row never has an empty softmax (which would be NaN).
    """
    if padding is None and window is None and (start == 0 or T == 1):
        return None
    q = torch.arange(start, start + T, device=device)[:, None]
    k = torch.arange(start + T, device=device)[None, :]
    mask = causal_mask(q, k, window)[None, None]
    if padding is not None:
        mask = mask & padding[:, None, None, :].bool()
    return mask | (k == q)


class KVCache:
    """Preallocated keys and values for every layer, so each decode step attends without recomputing."""

    def __init__(self, config: ModelConfig, batch_size: int, max_length: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        shape = (batch_size, config.num_key_value_heads, max_length, config.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.length = 0
        self.max_length = max_length

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store this step's k/v after what is cached and return everything cached so far."""
        end = self.length + k.shape[2]
        if end > self.max_length:
            raise ValueError(f"KV cache holds {self.max_length} positions; {end} requested")
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, n: int) -> None:
        """Called once per forward after every layer has stored its `n` new positions."""
        self.length += n


class Attention(nn.Module):
    """softmax(QKᵀ/√d_k)·V over heads, with grouped K/V heads (GQA, Ainslie et al. 2023)."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv_head, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        qkv_out = (self.n_head + 2 * self.n_kv_head) * self.head_dim
        self.qkv = nn.Linear(config.hidden_size, qkv_out, bias=config.bias or config.qkv_bias)
        self.proj = nn.Linear(self.n_head * self.head_dim, config.hidden_size, bias=config.bias)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=config.norm_eps) if config.qk_norm else None
        self.k_norm = nn.RMSNorm(self.head_dim, eps=config.norm_eps) if config.qk_norm else None
        self.dropout = config.dropout
        self.scale: float | None = None  # None = 1/√d_k; T5 folds the scale into its weights and sets 1.0

    def split_heads(self, qkv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, T, _ = qkv.shape
        sizes = [self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim]
        q, k, v = qkv.split(sizes, dim=-1)
        return (q.view(B, T, -1, self.head_dim).transpose(1, 2),
                k.view(B, T, -1, self.head_dim).transpose(1, 2),
                v.view(B, T, -1, self.head_dim).transpose(1, 2))

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None,
                cache: KVCache | None = None, mask: Tensor | None = None) -> Tensor:
        T = x.shape[1]
        q, k, v = self.split_heads(self.qkv(x))
        if self.q_norm is not None:  # Qwen3: normalise per head before rotating
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        return self.attend(q, k, v, mask, causal=mask is None and T > 1)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool = False) -> Tensor:
        """The attention itself over heads [B, H, T, D] and the output projection. `mask` is boolean
        (True = attend) or additive (a float bias such as T5's relative positions, -inf where masked)."""
        B, T = q.shape[0], q.shape[2]
        if self.n_kv_head != self.n_head and not _SDPA_HAS_GQA:
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        gqa = {"enable_gqa": True} if self.n_kv_head != self.n_head and _SDPA_HAS_GQA else {}
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal,
            dropout_p=self.dropout if self.training else 0.0, scale=self.scale, **gqa)
        return self.proj(y.transpose(1, 2).reshape(B, T, -1))

    def memory_kv(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        """Cross-attention (Vaswani et al. 2017, encoder-decoder attention): keys and values from another
        sequence [B, S, hidden], through the k/v rows of the same projection. An encoder-decoder computes
        them once per source and reuses them at every decoding step."""
        B, S, _ = memory.shape
        q_rows = self.n_head * self.head_dim
        bias = self.qkv.bias[q_rows:] if self.qkv.bias is not None else None
        k, v = F.linear(memory, self.qkv.weight[q_rows:], bias).view(B, S, 2 * self.n_kv_head, self.head_dim
                                                                       ).transpose(1, 2).chunk(2, dim=1)
        return k, v

    def cross(self, x: Tensor, kv: tuple[Tensor, Tensor], mask: Tensor | None) -> Tensor:
        """Queries from `x` [B, T, hidden] attend to keys/values from `memory_kv`; `mask` [B, 1, 1|T, S]."""
        B, T, _ = x.shape
        q_rows = self.n_head * self.head_dim
        bias = self.qkv.bias[:q_rows] if self.qkv.bias is not None else None
        q = F.linear(x, self.qkv.weight[:q_rows], bias).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        return self.attend(q, *kv, mask)


ACTIVATIONS = {"gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu,
               "silu": F.silu, "swiglu": F.silu, "geglu": lambda x: F.gelu(x, approximate="tanh")}
GATED = ("swiglu", "geglu")


class MLP(nn.Module):
    """GELU MLP (Hendrycks & Gimpel 2016; GPT-2 uses its tanh approximation), ReLU (Vaswani et al. 2017)
    or SiLU (Marian's "swish"), or gated: SwiGLU silu(xW_gate)·(xW_up) and GEGLU, its GELU twin that T5
    v1.1 uses (Shazeer 2020); then a projection back down."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.swiglu = config.mlp in GATED  # gated (SwiGLU or GEGLU): `up` holds [gate | up] (lora, prune read this)
        self.act = ACTIVATIONS[config.mlp]
        width = config.intermediate_size * (2 if self.swiglu else 1)
        self.up = nn.Linear(config.hidden_size, width, bias=config.bias)
        self.down = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.swiglu:
            gate, up = self.up(x).chunk(2, dim=-1)
            return self.down(self.act(gate) * up)
        return self.down(self.act(self.up(x)))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)) (GPT-2, Radford et al. 2019)."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.attn_norm = norm_layer(config, config.hidden_size)
        self.attn = Attention(config, layer)
        self.mlp_norm = norm_layer(config, config.hidden_size)
        self.mlp = MLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None,
                cache: KVCache | None = None, mask: Tensor | None = None) -> Tensor:
        x = x + self.dropout(self.attn(self.attn_norm(x), rope, cache, mask))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


class GPT(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.pos_embed = (nn.Embedding(config.max_position_embeddings, config.hidden_size)
                          if config.position == "learned" else None)
        self.rope = Rope(config) if config.position == "rope" else None
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = norm_layer(config, config.hidden_size)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        init_weights(self, config)
        if config.tie_word_embeddings:  # Press & Wolf 2017: one matrix reads and writes tokens
            self.lm_head.weight = self.embed.weight

    def forward(self, idx: Tensor, cache: KVCache | None = None, *, positions: Tensor | None = None,
                attention_mask: Tensor | None = None) -> Tensor:
        """Logits [B, T, vocab] for token ids [B, T]; see `hidden` for the optional arguments."""
        return self.lm_head(self.hidden(idx, cache, positions=positions, attention_mask=attention_mask))

    def hidden(self, idx: Tensor, cache: KVCache | None = None, *, positions: Tensor | None = None,
               attention_mask: Tensor | None = None) -> Tensor:
        """The final normed hidden states [B, T, hidden] (what heads read).

        With a cache, positions continue after what it holds. `attention_mask` is either HF's padding
        mask [B, cached + T] (1 = real token; positions then count real tokens only, so a left-padded
        row equals the unpadded sequence) or a full boolean mask [B, 1, T, cached + T] (True = attend)
        used as given, e.g. block-diagonal for packed examples. `positions` [T] or [B, T] overrides.
        """
        start = cache.length if cache is not None else 0
        T = idx.shape[1]
        if start + T > self.config.max_position_embeddings:
            raise ValueError(f"sequence of {start + T} tokens exceeds the context of "
                             f"{self.config.max_position_embeddings}")
        padding = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
        if positions is None:
            if padding is not None:
                positions = (padding.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
            else:
                positions = torch.arange(start, start + T, device=idx.device)
        x = self.embed(idx)
        if self.pos_embed is not None:
            x = x + self.pos_embed(positions)
        x = self.dropout(x)
        if attention_mask is not None and attention_mask.dim() == 4:
            mask = attention_mask.bool()
        else:
            mask = build_mask(T, start, padding, self.config.sliding_window, idx.device)
        rope = self.rope(positions) if self.rope is not None else None
        for block in self.blocks:
            x = block(x, rope, cache, mask)
        if cache is not None:
            cache.advance(T)
        return self.norm(x)

    def new_cache(self, batch_size: int, max_length: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        weight = self.embed.weight
        return KVCache(self.config, batch_size, max_length or self.config.max_position_embeddings,
                       device=weight.device, dtype=dtype or weight.dtype)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Unique parameters (a tied head counts once); without embeddings as in Kaplan et al. 2020."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.embed.weight.numel()
            if self.pos_embed is not None:
                n -= self.pos_embed.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None, training: bool = True) -> float:
        """6N + 12·L·d·T for a training step (PaLM, Chowdhery et al. 2022, appendix B); a third of it forward only.

        N counts the non-embedding parameters plus the head's matrix (the matmuls); the second term
        is attention's QKᵀ and AV.
        """
        c = self.config
        T = seq_len or c.max_position_embeddings
        matmul_params = self.num_params(exclude_embeddings=True) + self.lm_head.weight.numel()
        attention = 4 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * T
        forward = 2 * matmul_params + attention
        return 3 * forward if training else forward

