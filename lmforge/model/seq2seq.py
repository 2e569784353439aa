"""An encoder-decoder Transformer (Vaswani et al. 2017): the original architecture, for translation and summaries.

The encoder reads the whole source with bidirectional self-attention (padding masked out); the decoder reads
the target so far with causal self-attention, then attends to the encoder's output (cross-attention), and
predicts the next target token. Attention, MLP and norms are gpt.py's blocks; only the wiring is new here:
three residual sublayers per decoder layer instead of two, and the norm before (pre-LN, Xiong et al. 2020,
the default: stable without warmup tricks) or after (post-LN, the 2017 paper and Marian) each residual sum.

Positions are sinusoidal (the paper; Marian), learned, or T5's relative position buckets (Raffel et al. 2020):
a learned scalar per head and bucket of (key − query) distance added to the attention logits. Source, target
and output embeddings are one matrix (Press & Wolf 2017) when `tie_embeddings`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lmforge.config import ModelConfig, config_from_dict, read_config_json
from lmforge.errors import ConfigError
from lmforge.model.gpt import MLP, Attention, KVCache, build_mask, norm_layer
from lmforge.model.init import init_weights

SEQ2SEQ_MODEL_TYPE = "lmforge-seq2seq"
# our activation name → gpt.py's MLP kind ("swish" is Marian's name for SiLU; "gated-gelu" T5 v1.1's GEGLU)
ACTIVATION_TO_MLP = {"gelu": "gelu", "gelu_tanh": "gelu_tanh", "relu": "relu", "swish": "silu",
                     "gated-gelu": "geglu", "swiglu": "swiglu"}
CHOICES = {"norm_position": ("pre", "post"), "norm": ("layernorm", "rmsnorm"),
           "position": ("sinusoidal", "learned", "relative"), "activation": tuple(ACTIVATION_TO_MLP)}


@dataclass
class Seq2SeqConfig:
    """Shape of an encoder-decoder; Marian's and T5's knobs are flags, so both import exactly.

    The 2017 paper / Marian: post-LN, sinusoidal positions, embeddings × √d_model, biases, LayerNorm.
    T5 (Raffel et al. 2020): pre-LN, relative position buckets, RMSNorm without biases, no embedding or
    attention scale (folded into the initialisation), ReLU (v1.0) or gated GELU (v1.1), and, with a tied
    head, decoder output × d_model^-0.5 before it.
    """

    vocab_size: int = 8192
    d_model: int = 256
    n_heads: int = 4
    n_encoder_layers: int = 3
    n_decoder_layers: int = 3
    d_ff: int | None = None  # None = 4·d_model
    d_kv: int | None = None  # width of one head; None = d_model // n_heads (T5 sets it freely)
    max_positions: int = 512  # longest source or target (sinusoidal/learned; relative has no limit but this)
    norm_position: Literal["pre", "post"] = "pre"
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = 1e-5
    position: Literal["sinusoidal", "learned", "relative"] = "sinusoidal"
    relative_buckets: int = 32  # T5's relative_attention_num_buckets
    relative_max_distance: int = 128  # T5's relative_attention_max_distance
    activation: Literal["gelu", "gelu_tanh", "relu", "swish", "gated-gelu", "swiglu"] = "gelu"
    bias: bool = True  # bias on every Linear and LayerNorm (Marian); T5 has none
    tie_embeddings: bool = True  # the output head is the (shared source/target) embedding
    scale_embeddings: bool = True  # embeddings × √d_model (Vaswani et al. 2017, section 3.4)
    scale_attention: bool = True  # 1/√d_k in attention; T5 has none
    rescale_output: bool = False  # decoder output × d_model^-0.5 before the head (T5 with tied embeddings)
    final_logits_bias: bool = False  # a bias on the output logits (Marian's final_logits_bias)
    final_norm: bool | None = None  # a norm after the last encoder and decoder layer; None = only when pre-LN
    pad_id: int = 0
    decoder_start_id: int = 0  # the decoder's first input token (Marian and T5 use pad)
    eos_id: int = 1
    source_eos: bool = False  # sources end with eos (Marian and T5 were trained so); ours are bare text
    dropout: float = 0.1
    label_smoothing: float = 0.1  # Szegedy et al. 2016; the training loss reads it (Vaswani et al. use 0.1)
    initializer_range: float = 0.02
    family: str = "lmforge"  # "marian" or "t5" when imported; what `convert to-hf` exports as

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_heads", "n_encoder_layers", "n_decoder_layers", "max_positions"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be at least 1")
        if self.d_kv is None:
            if self.d_model % self.n_heads:
                raise ConfigError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
            self.d_kv = self.d_model // self.n_heads
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model
        if self.final_norm is None:
            self.final_norm = self.norm_position == "pre"
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}={getattr(self, name)!r} is not one of {allowed}")
        if self.position == "sinusoidal" and self.d_model % 2:
            raise ConfigError(f"d_model={self.d_model} must be even for sinusoidal positions")
        for name in ("pad_id", "decoder_start_id", "eos_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ConfigError(f"{name}={getattr(self, name)} is outside the vocabulary of {self.vocab_size}")

    def block_config(self, layers: int) -> ModelConfig:
        """The gpt.py config its attention/MLP/norm blocks read (positions are handled here, not in them)."""
        return ModelConfig(vocab_size=self.vocab_size, hidden_size=self.d_model, num_hidden_layers=layers,
                           num_attention_heads=self.n_heads, head_dim=self.d_kv, intermediate_size=self.d_ff,
                           max_position_embeddings=self.max_positions, norm=self.norm, norm_eps=self.norm_eps,
                           mlp=ACTIVATION_TO_MLP[self.activation], position="learned", bias=self.bias,
                           dropout=self.dropout, initializer_range=self.initializer_range)

    def to_dict(self) -> dict[str, Any]:
        return {"architectures": ["LMForgeSeq2Seq"], "model_type": SEQ2SEQ_MODEL_TYPE, "architecture": "seq2seq",
                **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> Seq2SeqConfig:
        return config_from_dict(cls, {k: v for k, v in data.items() if k != "architecture"}, source)

    @classmethod
    def load(cls, path: str | Path) -> Seq2SeqConfig:
        return cls.from_dict(read_config_json(Path(path)), source=str(path))

    def replace(self, **changes: Any) -> Seq2SeqConfig:
        return dataclasses.replace(self, **changes)


_BASE = dict(norm_position="pre", norm="layernorm", position="sinusoidal", activation="gelu", dropout=0.1)
# Sized for a CPU. small: a deep encoder and a shallower decoder (Kasai et al. 2021: decoding, the slow
# part, costs per decoder layer) — about 12M parameters at a 16k vocabulary.
SEQ2SEQ_PRESETS: dict[str, dict[str, Any]] = {
    "seq2seq-tiny": dict(_BASE, d_model=64, n_heads=4, n_encoder_layers=2, n_decoder_layers=2, d_ff=128,
                         max_positions=128),
    "seq2seq-small": dict(_BASE, d_model=256, n_heads=4, n_encoder_layers=6, n_decoder_layers=3, d_ff=1024,
                          max_positions=256),
    "seq2seq-base": dict(_BASE, d_model=512, n_heads=8, n_encoder_layers=6, n_decoder_layers=6, d_ff=2048,
                         max_positions=512),  # the paper's "base" shape (65M at a 37k vocabulary)
}


def seq2seq_preset(name: str, **overrides: Any) -> Seq2SeqConfig:
    """A named encoder-decoder shape with overrides, e.g. `seq2seq_preset("seq2seq-small", vocab_size=16000)`."""
    if name not in SEQ2SEQ_PRESETS:
        raise ConfigError(f"unknown seq2seq preset {name!r}; presets: {', '.join(SEQ2SEQ_PRESETS)}")
    return Seq2SeqConfig(**{**SEQ2SEQ_PRESETS[name], **overrides})


def sinusoid(positions: Tensor, dim: int) -> Tensor:
    """sin(p / 10000^(2i/d)) in the first half of the vector, cos in the second (Vaswani et al. 2017 §3.5,
    in the tensor2tensor / Marian layout rather than interleaved), for positions [T] → [T, dim]."""
    inv_freq = 1.0 / 10000 ** (torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim)
    angles = positions[:, None].float() * inv_freq
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def relative_bucket(relative: Tensor, bidirectional: bool, buckets: int, max_distance: int) -> Tensor:
    """T5's bucket of a (key − query) distance: exact for small distances, logarithmic up to `max_distance`,
    one bucket beyond; the encoder tells left from right, the (causal) decoder only looks left."""
    bucket = torch.zeros_like(relative)
    if bidirectional:
        buckets //= 2
        bucket += (relative > 0).long() * buckets
        distance = relative.abs()
    else:
        distance = (-relative).clamp(min=0)
    exact = buckets // 2
    log_bucket = exact + (torch.log(distance.float() / exact) / math.log(max_distance / exact)
                          * (buckets - exact)).long()
    log_bucket = log_bucket.clamp(max=buckets - 1)
    return bucket + torch.where(distance < exact, distance, log_bucket)


class RelativeBias(nn.Module):
    """Per-head scalar biases of T5's relative positions, [1, heads, queries, keys], shared by every layer."""

    def __init__(self, config: Seq2SeqConfig, bidirectional: bool) -> None:
        super().__init__()
        self.bidirectional, self.buckets, self.max_distance = (
            bidirectional, config.relative_buckets, config.relative_max_distance)
        self.embed = nn.Embedding(config.relative_buckets, config.n_heads)

    def forward(self, queries: Tensor, keys: Tensor) -> Tensor:
        bucket = relative_bucket(keys[None, :] - queries[:, None], self.bidirectional, self.buckets,
                                 self.max_distance)
        return self.embed(bucket).permute(2, 0, 1)[None]


class Sublayers(nn.Module):
    """The residual wiring shared by encoder and decoder layers: pre-LN x + f(norm(x)), or post-LN norm(x + f(x))."""

    post: bool

    def residual(self, x: Tensor, norm: nn.Module, f: Any) -> Tensor:
        if self.post:
            return norm(x + self.dropout(f(x)))
        return x + self.dropout(f(norm(x)))


class EncoderLayer(Sublayers):
    def __init__(self, config: Seq2SeqConfig, block: ModelConfig, layer: int) -> None:
        super().__init__()
        self.post = config.norm_position == "post"
        self.attn_norm, self.attn = norm_layer(block, config.d_model), Attention(block, layer)
        self.mlp_norm, self.mlp = norm_layer(block, config.d_model), MLP(block)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = self.residual(x, self.attn_norm, lambda h: self.attn(h, None, None, mask))
        return self.residual(x, self.mlp_norm, self.mlp)


class DecoderLayer(Sublayers):
    def __init__(self, config: Seq2SeqConfig, block: ModelConfig, layer: int) -> None:
        super().__init__()
        self.post = config.norm_position == "post"
        self.attn_norm, self.attn = norm_layer(block, config.d_model), Attention(block, layer)
        self.cross_norm, self.cross = norm_layer(block, config.d_model), Attention(block, layer)
        self.mlp_norm, self.mlp = norm_layer(block, config.d_model), MLP(block)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, self_mask: Tensor | None, cache: KVCache | None,
                memory_kv: tuple[Tensor, Tensor], cross_mask: Tensor) -> Tensor:
        x = self.residual(x, self.attn_norm, lambda h: self.attn(h, None, cache, self_mask))
        x = self.residual(x, self.cross_norm, lambda h: self.cross.cross(h, memory_kv, cross_mask))
        return self.residual(x, self.mlp_norm, self.mlp)


class Stack(nn.Module):
    """The layers of the encoder or the decoder, its final norm (pre-LN) and its relative position bias (T5)."""

    def __init__(self, config: Seq2SeqConfig, layer: type[EncoderLayer] | type[DecoderLayer], n: int,
                 bidirectional: bool) -> None:
        super().__init__()
        block = config.block_config(n)
        self.blocks = nn.ModuleList(layer(config, block, i) for i in range(n))
        self.norm = norm_layer(block, config.d_model) if config.final_norm else None
        self.relative = RelativeBias(config, bidirectional) if config.position == "relative" else None
        if not config.scale_attention:
            for module in self.modules():
                if isinstance(module, Attention):
                    module.scale = 1.0

    def finish(self, x: Tensor) -> Tensor:
        return self.norm(x) if self.norm is not None else x


class Seq2SeqCache:
    """What decoding keeps between steps: the decoder's self-attention keys/values (gpt.py's KVCache) and each
    layer's cross-attention keys/values, computed from the encoder output once per source."""

    def __init__(self, model: Seq2Seq, batch_size: int, max_length: int) -> None:
        weight = model.embed.weight
        block = model.config.block_config(model.config.n_decoder_layers)
        self.self_attn = KVCache(block, batch_size, max_length, device=weight.device, dtype=weight.dtype)
        self.cross: list[tuple[Tensor, Tensor]] | None = None

    @property
    def length(self) -> int:
        return self.self_attn.length

    def select(self, rows: Tensor) -> None:
        """Keep (and reorder, repeat) batch rows: beams continue other beams, finished sources leave."""
        kv = self.self_attn
        kv.keys = [k.index_select(0, rows) for k in kv.keys]
        kv.values = [v.index_select(0, rows) for v in kv.values]
        if self.cross is not None:
            self.cross = [(k.index_select(0, rows), v.index_select(0, rows)) for k, v in self.cross]


class Seq2Seq(nn.Module):
    def __init__(self, config: Seq2SeqConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.embed = nn.Embedding(c.vocab_size, c.d_model)  # source and target share it (one vocabulary)
        self.pos_embed = nn.Embedding(c.max_positions, c.d_model) if c.position == "learned" else None
        self.dropout = nn.Dropout(c.dropout)
        self.encoder = Stack(c, EncoderLayer, c.n_encoder_layers, bidirectional=True)
        self.decoder = Stack(c, DecoderLayer, c.n_decoder_layers, bidirectional=False)
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        # Marian's final_logits_bias, kept in its [1, V] shape
        self.final_logits_bias = nn.Parameter(torch.zeros(1, c.vocab_size)) if c.final_logits_bias else None
        init_weights(self, c.block_config(c.n_encoder_layers + c.n_decoder_layers))
        if self.final_logits_bias is not None:
            nn.init.zeros_(self.final_logits_bias)
        if c.scale_embeddings:  # fairseq: N(0, d^-1/2), so that after ×√d the input has unit variance
            nn.init.normal_(self.embed.weight, std=c.d_model ** -0.5)
        if c.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    # ------------------------------------------------------------------------------------------ pieces

    def embed_tokens(self, idx: Tensor, positions: Tensor) -> Tensor:
        c = self.config
        if int(positions[-1]) >= c.max_positions and c.position != "relative":
            raise ValueError(f"sequence of {int(positions[-1]) + 1} tokens exceeds max_positions={c.max_positions}")
        x = self.embed(idx)
        if c.scale_embeddings:
            x = x * math.sqrt(c.d_model)
        if c.position == "sinusoidal":
            x = x + sinusoid(positions, c.d_model).to(x.dtype)
        elif self.pos_embed is not None:
            x = x + self.pos_embed(positions)
        return self.dropout(x)

    def cross_mask(self, src_mask: Tensor) -> Tensor:
        return src_mask[:, None, None, :].bool()

    def encode(self, src: Tensor, src_mask: Tensor | None = None) -> Tensor:
        """The encoder's output [B, S, D] for source ids [B, S]; `src_mask` marks real tokens with True."""
        S = src.shape[1]
        if src_mask is None:
            src_mask = torch.ones_like(src, dtype=torch.bool)
        positions = torch.arange(S, device=src.device)
        x = self.embed_tokens(src, positions)
        mask: Tensor = self.cross_mask(src_mask)  # every query sees every real key (bidirectional)
        if self.encoder.relative is not None:
            bias = self.encoder.relative(positions, positions).to(x.dtype)
            mask = bias.masked_fill(~mask, float("-inf"))
        for block in self.encoder.blocks:
            x = block(x, mask)
        return self.encoder.finish(x)

    def decode(self, tgt_in: Tensor, memory: Tensor | None, src_mask: Tensor,
               cache: Seq2SeqCache | None = None) -> Tensor:
        """Logits [B, T, V] for decoder inputs [B, T] attending to `memory` (the encoder output).

        With a cache, `tgt_in` continues what it holds, and the cross-attention keys/values are computed
        from `memory` on the first call only (later calls may pass memory=None).
        """
        start = cache.length if cache is not None else 0
        T = tgt_in.shape[1]
        positions = torch.arange(start, start + T, device=tgt_in.device)
        x = self.embed_tokens(tgt_in, positions)
        self_mask = build_mask(T, start, None, None, tgt_in.device)  # None: plain causal, SDPA's own
        if self.decoder.relative is not None:
            keys = torch.arange(start + T, device=tgt_in.device)
            bias = self.decoder.relative(positions, keys).to(x.dtype)
            self_mask = bias.masked_fill(keys[None, :] > positions[:, None], float("-inf"))
        cross_mask = self.cross_mask(src_mask)
        if cache is not None and cache.cross is None:
            cache.cross = [block.cross.memory_kv(memory) for block in self.decoder.blocks]
        kv_cache = cache.self_attn if cache is not None else None
        for i, block in enumerate(self.decoder.blocks):
            memory_kv = cache.cross[i] if cache is not None else block.cross.memory_kv(memory)
            x = block(x, self_mask, kv_cache, memory_kv, cross_mask)
        if cache is not None:
            cache.self_attn.advance(T)
        x = self.decoder.finish(x)
        if self.config.rescale_output:
            x = x * self.config.d_model ** -0.5
        logits = self.lm_head(x)
        return logits + self.final_logits_bias if self.final_logits_bias is not None else logits

    def forward(self, src: Tensor, src_mask: Tensor | None, tgt_in: Tensor) -> Tensor:
        """Logits [B, T, V] of every target position at once (teacher forcing)."""
        if src_mask is None:
            src_mask = torch.ones_like(src, dtype=torch.bool)
        return self.decode(tgt_in, self.encode(src, src_mask), src_mask)

    def new_cache(self, batch_size: int, max_length: int | None = None) -> Seq2SeqCache:
        return Seq2SeqCache(self, batch_size, max_length or self.config.max_positions)

    # ------------------------------------------------------------------------------------------- sizes

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Unique parameters (a tied head counts once), optionally without the embedding tables."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.embed.weight.numel() + (self.pos_embed.weight.numel() if self.pos_embed is not None else 0)
        return n

    def flops_per_token(self, seq_len: int | None = None, training: bool = True) -> float:
        """≈ 6N + attention per target token (PaLM's estimate, as in gpt.py), counting the source as long as
        the target: every parameter and the three attention kinds (encoder, decoder, cross) once each."""
        c = self.config
        T = seq_len or c.max_positions
        matmul_params = self.num_params(exclude_embeddings=True) + self.lm_head.weight.numel()
        attention = 4 * (c.n_encoder_layers + 2 * c.n_decoder_layers) * c.n_heads * c.d_kv * T
        forward = 2 * matmul_params + attention
        return 3 * forward if training else forward
