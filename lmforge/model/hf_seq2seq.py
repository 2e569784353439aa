"""Hugging Face encoder-decoders in and out: MarianMT (opus-mt) and T5 (v1.0 and v1.1), as tables like hf.py's.

Both are seq2seq.py's model under different flags. Marian: post-LN, sinusoidal positions (not stored: computed
from the position), SiLU ("swish"), embeddings × √d_model, biases everywhere, `final_logits_bias`. T5: pre-LN
with RMSNorm and no biases, relative position buckets learned in the first layer of each stack and shared by the
others, no scale on embeddings or attention logits, ReLU (v1.0) or gated GELU (v1.1), and a tied head reading
the decoder output × d_model^-0.5 (transformers calls it `scale_decoder_outputs`).

Our attention keeps q, k, v in one `qkv` matrix and the gated MLP keeps [gate | up] in one `up`, so a rule
concatenates their tensors on import and splits them on export, exactly as hf.py does for decoders.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from lmforge.errors import CheckpointError, ConfigError
from lmforge.model.hf import Rule, import_tensors, read_hf_config
from lmforge.model.seq2seq import Seq2Seq, Seq2SeqConfig
from lmforge.model.tensorfile import TensorSource

MODEL_TYPES = ("marian", "t5")
ARCHITECTURES = {"marian": "MarianMTModel", "t5": "T5ForConditionalGeneration"}
MARIAN_ACT = {"swish": "swish", "silu": "swish", "gelu": "gelu", "relu": "relu", "gelu_new": "gelu_tanh"}
T5_ACT = {"relu": "relu", "gelu": "gelu", "gated-gelu": "gated-gelu", "gated-silu": "swiglu"}
# Stored copies of what we tie or compute: per-stack token embeddings (= shared), Marian's sinusoid table.
IGNORED = re.compile(r"((encoder|decoder)\.embed_tokens\.weight|embed_positions\.weight)$")


def is_seq2seq(hf_config: dict[str, Any]) -> bool:
    return hf_config.get("model_type") in MODEL_TYPES


def _require(hf: dict[str, Any], key: str, source: str) -> Any:
    if hf.get(key) is None:
        raise ConfigError(f"{source}: config.json has no {key!r}")
    return hf[key]


def _tied(hf: dict[str, Any], names: set[str] | None) -> bool:
    """A separate head only when the config unties it and the file holds one (transformers ≥ 5 always ties)."""
    return hf.get("tie_word_embeddings", True) is not False or (names is not None and "lm_head.weight" not in names)


def config_from_hf(hf: dict[str, Any], source: str = "config.json", names: set[str] | None = None) -> Seq2SeqConfig:
    """Our config for a Marian or T5 config.json (and the tensor names of its weights, which say whether the
    head is tied), or a ConfigError naming what does not fit."""
    kind = hf.get("model_type")
    if kind == "marian":
        for a, b in (("encoder_attention_heads", "decoder_attention_heads"), ("encoder_ffn_dim", "decoder_ffn_dim")):
            if hf.get(a) != hf.get(b):
                raise ConfigError(f"{source}: {a}={hf.get(a)} differs from {b}={hf.get(b)}; lmforge's encoder and "
                                  "decoder share one width")
        if hf.get("share_encoder_decoder_embeddings", True) is False or hf.get("decoder_vocab_size") not in (
                None, hf.get("vocab_size")):
            raise ConfigError(f"{source}: separate source and target vocabularies are not supported "
                              "(share_encoder_decoder_embeddings=false)")
        act = hf.get("activation_function", "gelu")
        if act not in MARIAN_ACT:
            raise ConfigError(f"{source}: activation_function={act!r} is not supported; one of {sorted(MARIAN_ACT)}")
        pad = _require(hf, "pad_token_id", source)
        return Seq2SeqConfig(
            vocab_size=_require(hf, "vocab_size", source), d_model=_require(hf, "d_model", source),
            n_heads=_require(hf, "encoder_attention_heads", source),
            n_encoder_layers=_require(hf, "encoder_layers", source),
            n_decoder_layers=_require(hf, "decoder_layers", source), d_ff=_require(hf, "encoder_ffn_dim", source),
            max_positions=hf.get("max_position_embeddings", 512), norm_position="post", norm="layernorm",
            norm_eps=1e-5, position="sinusoidal", activation=MARIAN_ACT[act], bias=True,
            tie_embeddings=_tied(hf, names), scale_embeddings=bool(hf.get("scale_embedding", False)),
            final_logits_bias=True, final_norm=False, pad_id=pad,
            decoder_start_id=hf.get("decoder_start_token_id", pad), eos_id=_require(hf, "eos_token_id", source),
            source_eos=True, dropout=0.0, initializer_range=hf.get("init_std", 0.02), family="marian")
    if kind == "t5":
        proj = hf.get("feed_forward_proj", "relu")
        if proj not in T5_ACT:
            raise ConfigError(f"{source}: feed_forward_proj={proj!r} is not supported; one of {sorted(T5_ACT)}")
        rescale = hf.get("scale_decoder_outputs")
        if rescale is None:  # before transformers 5: a tied head implied the rescale
            rescale = hf.get("tie_word_embeddings", True) is not False
        pad = hf.get("pad_token_id", 0)
        return Seq2SeqConfig(
            vocab_size=_require(hf, "vocab_size", source), d_model=_require(hf, "d_model", source),
            n_heads=_require(hf, "num_heads", source), d_kv=_require(hf, "d_kv", source),
            n_encoder_layers=_require(hf, "num_layers", source),
            n_decoder_layers=hf.get("num_decoder_layers") or hf["num_layers"], d_ff=_require(hf, "d_ff", source),
            max_positions=hf.get("n_positions", 512), norm_position="pre", norm="rmsnorm",
            norm_eps=hf.get("layer_norm_epsilon", 1e-6), position="relative",
            relative_buckets=hf.get("relative_attention_num_buckets", 32),
            relative_max_distance=hf.get("relative_attention_max_distance", 128), activation=T5_ACT[proj],
            bias=False, tie_embeddings=_tied(hf, names), scale_embeddings=False, scale_attention=False,
            rescale_output=bool(rescale), final_logits_bias=False, final_norm=True, pad_id=pad,
            decoder_start_id=hf.get("decoder_start_token_id", pad), eos_id=hf.get("eos_token_id", 1),
            source_eos=True, dropout=0.0, initializer_range=hf.get("initializer_factor", 1.0), family="t5")
    raise ConfigError(f"{source}: model_type={kind!r} is not an encoder-decoder lmforge imports "
                      f"({', '.join(MODEL_TYPES)})")


def hf_family(config: Seq2SeqConfig) -> str:
    """Which HF architecture holds this config exactly, or a ConfigError saying why none does."""
    c = config
    if not c.tie_embeddings:
        raise ConfigError("only seq2seq models with tied embeddings export to Hugging Face (transformers ties "
                          "Marian's and T5's heads); this one has tie_embeddings=false")
    if (c.norm_position, c.position, c.norm, c.bias, c.final_norm, c.scale_attention, c.rescale_output) == (
            "post", "sinusoidal", "layernorm", True, False, True, False) and c.activation in MARIAN_ACT.values() \
            and c.d_kv * c.n_heads == c.d_model:
        return "marian"
    if (c.norm_position, c.position, c.norm, c.bias, c.final_norm, c.scale_embeddings, c.scale_attention,
            c.final_logits_bias) == ("pre", "relative", "rmsnorm", False, True, False, False, False) \
            and c.activation in T5_ACT.values():
        return "t5"
    raise ConfigError(
        "no Hugging Face architecture holds this seq2seq config exactly: Marian needs norm_position=post, "
        "position=sinusoidal, norm=layernorm, bias=true (no final norm); T5 needs norm_position=pre, "
        f"position=relative, norm=rmsnorm, bias=false, scale_embeddings=false, scale_attention=false; this one has "
        f"norm_position={c.norm_position}, position={c.position}, norm={c.norm}, bias={c.bias}")


def config_to_hf(config: Seq2SeqConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    c, family = config, hf_family(config)
    ids = {"pad_token_id": c.pad_id, "eos_token_id": c.eos_id, "decoder_start_token_id": c.decoder_start_id}
    common = {"architectures": [ARCHITECTURES[family]], "model_type": family, "vocab_size": c.vocab_size,
              "d_model": c.d_model, "is_encoder_decoder": True, "torch_dtype": str(dtype).removeprefix("torch."), **ids}
    if family == "marian":
        act = {v: k for k, v in MARIAN_ACT.items() if k != "silu"}[c.activation]
        return {**common, "encoder_layers": c.n_encoder_layers, "decoder_layers": c.n_decoder_layers,
                "encoder_attention_heads": c.n_heads, "decoder_attention_heads": c.n_heads,
                "encoder_ffn_dim": c.d_ff, "decoder_ffn_dim": c.d_ff, "max_position_embeddings": c.max_positions,
                "activation_function": act, "scale_embedding": c.scale_embeddings, "share_encoder_decoder_embeddings":
                True, "tie_word_embeddings": True, "dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0,
                "init_std": c.initializer_range, "forced_eos_token_id": None}
    proj = {v: k for k, v in T5_ACT.items()}[c.activation]
    # transformers < 5 reads the rescale off tie_word_embeddings; with false it wants the head stored, which
    # export_tensors then writes (a copy of the embedding); transformers ≥ 5 reads scale_decoder_outputs
    return {**common, "d_kv": c.d_kv, "d_ff": c.d_ff, "num_layers": c.n_encoder_layers,
            "num_decoder_layers": c.n_decoder_layers, "num_heads": c.n_heads,
            "relative_attention_num_buckets": c.relative_buckets,
            "relative_attention_max_distance": c.relative_max_distance, "layer_norm_epsilon": c.norm_eps,
            "feed_forward_proj": proj, "dropout_rate": 0.0, "scale_decoder_outputs": c.rescale_output,
            "tie_word_embeddings": c.rescale_output, "n_positions": c.max_positions}


# ------------------------------------------------------------------------------------------------ rules

def rules(config: Seq2SeqConfig) -> list[Rule]:
    """Every tensor of our model and where it comes from in the HF checkpoint of its family."""
    c = config
    family = c.family if c.family in MODEL_TYPES else hf_family(c)
    qkv = (c.n_heads * c.d_kv,) * 3
    out: list[Rule] = []
    if family == "marian":
        out.append(Rule("embed.weight", ("model.shared.weight",)))
        for stack, n in (("encoder", c.n_encoder_layers), ("decoder", c.n_decoder_layers)):
            attns = [("attn", "self_attn")] + ([("cross", "encoder_attn")] if stack == "decoder" else [])
            for i in range(n):
                h, o = f"model.{stack}.layers.{i}.", f"{stack}.blocks.{i}."
                for kind in ("weight", "bias"):
                    for ours, theirs in attns:
                        out += [Rule(f"{o}{ours}.qkv.{kind}", tuple(f"{h}{theirs}.{x}_proj.{kind}" for x in "qkv"),
                                     split=qkv),
                                Rule(f"{o}{ours}.proj.{kind}", (f"{h}{theirs}.out_proj.{kind}",)),
                                Rule(f"{o}{ours}_norm.{kind}", (f"{h}{theirs}_layer_norm.{kind}",))]
                    out += [Rule(f"{o}mlp.up.{kind}", (f"{h}fc1.{kind}",)),
                            Rule(f"{o}mlp.down.{kind}", (f"{h}fc2.{kind}",)),
                            Rule(f"{o}mlp_norm.{kind}", (f"{h}final_layer_norm.{kind}",))]
        out.append(Rule("final_logits_bias", ("final_logits_bias",)))
    else:
        out.append(Rule("embed.weight", ("shared.weight",)))
        gated = c.activation in ("gated-gelu", "swiglu")
        for stack, n in (("encoder", c.n_encoder_layers), ("decoder", c.n_decoder_layers)):
            out.append(Rule(f"{stack}.relative.embed.weight",
                            (f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",)))
            attns = [("attn", "SelfAttention")] + ([("cross", "EncDecAttention")] if stack == "decoder" else [])
            for i in range(n):
                h, o = f"{stack}.block.{i}.layer.", f"{stack}.blocks.{i}."
                for j, (ours, theirs) in enumerate(attns):
                    qkv_names = tuple(f"{h}{j}.{theirs}.{x}.weight" for x in "qkv")
                    out += [Rule(f"{o}{ours}.qkv.weight", qkv_names, split=qkv),
                            Rule(f"{o}{ours}.proj.weight", (f"{h}{j}.{theirs}.o.weight",)),
                            Rule(f"{o}{ours}_norm.weight", (f"{h}{j}.layer_norm.weight",))]
                f = f"{h}{len(attns)}."
                up = (f"{f}DenseReluDense.wi_0.weight", f"{f}DenseReluDense.wi_1.weight") if gated else (
                    f"{f}DenseReluDense.wi.weight",)
                out += [Rule(f"{o}mlp.up.weight", up, split=(c.d_ff, c.d_ff) if gated else None),
                        Rule(f"{o}mlp.down.weight", (f"{f}DenseReluDense.wo.weight",)),
                        Rule(f"{o}mlp_norm.weight", (f"{f}layer_norm.weight",))]
            out.append(Rule(f"{stack}.norm.weight", (f"{stack}.final_layer_norm.weight",)))
    if not c.tie_embeddings:
        out.append(Rule("lm_head.weight", ("lm_head.weight",)))
    return out


def import_plan(config: Seq2SeqConfig, source: TensorSource) -> list[Rule]:
    """The rules, after checking that every tensor of the checkpoint is accounted for and none is missing."""
    names = set(source.names())
    plan = rules(config)
    expected = {n for r in plan for n in r.theirs}
    missing = sorted(n for n in expected if n not in names)
    tied_copy = {"lm_head.weight"} if config.tie_embeddings else set()
    unexpected = sorted(n for n in names - expected - tied_copy if not IGNORED.search(n))
    if missing or unexpected:
        raise CheckpointError(f"{source.directory}: tensors do not match config.json for {config.family}: "
                              f"missing {missing[:8]}{' …' if len(missing) > 8 else ''}, "
                              f"unexpected {unexpected[:8]}{' …' if len(unexpected) > 8 else ''}")
    return plan


def expected_shapes(config: Seq2SeqConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = Seq2Seq(config)
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def read_config(directory: Path) -> Seq2SeqConfig:
    """Our config for an HF Marian/T5 folder (its tensor names decide whether the head is tied)."""
    directory = Path(directory)
    return config_from_hf(read_hf_config(directory), str(directory / "config.json"),
                          set(TensorSource(directory).names()))


def load_hf_model(directory: Path, dtype: torch.dtype | None = None) -> tuple[Seq2Seq, Seq2SeqConfig]:
    """Our model holding a Marian or T5 checkpoint's weights, built without a second copy of them in memory."""
    directory = Path(directory)
    config = read_config(directory)
    source = TensorSource(directory)
    plan = import_plan(config, source)
    with torch.device("meta"):
        model = Seq2Seq(config)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    state = dict(import_tensors(config, source, plan, dtype or torch.float32, shapes))
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise CheckpointError(f"{directory}: no weights for {still_meta[:5]}")
    return model.eval(), config


# ----------------------------------------------------------------------------------------------- export

def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t if dtype is None or not t.is_floating_point() else t.to(dtype)


def _export_rules(config: Seq2SeqConfig) -> list[Rule]:
    family = hf_family(config)
    plan = rules(config.replace(family=family))
    if family == "t5" and not config.rescale_output:  # transformers < 5: an untied head, stored (= the embedding)
        plan.append(Rule("embed.weight", ("lm_head.weight",)))
    return plan


def export_tensors(config: Seq2SeqConfig, source: TensorSource, dtype: torch.dtype | None = None,
                   ) -> Iterator[tuple[str, torch.Tensor]]:
    """HF tensors one at a time from our checkpoint, in `export_layout`'s order."""
    for rule in _export_rules(config):
        if rule.ours == "final_logits_bias" and not config.final_logits_bias:
            yield rule.theirs[0], torch.zeros(1, config.vocab_size, dtype=dtype or torch.float32)
            continue
        tensor = _cast(source.read(rule.ours), dtype)
        parts = list(tensor.split(list(rule.split), dim=0)) if rule.split else [tensor]
        for name, part in zip(rule.theirs, parts):
            yield name, part.contiguous()


def export_layout(config: Seq2SeqConfig, source: TensorSource, dtype: torch.dtype | None = None,
                  ) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    layout = []
    for rule in _export_rules(config):
        if rule.ours == "final_logits_bias" and not config.final_logits_bias:
            layout.append((rule.theirs[0], (1, config.vocab_size), dtype or torch.float32))
            continue
        shape, stored = source.shape(rule.ours), source.dtype(rule.ours)
        out_dtype = dtype if dtype is not None and stored.is_floating_point else stored
        for name, size in zip(rule.theirs, rule.split or (shape[0],)):
            layout.append((name, (size, *shape[1:]), out_dtype))
    return layout
