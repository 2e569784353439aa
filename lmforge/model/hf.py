"""Hugging Face checkpoints in and out: GPT-2, Llama 2/3, Mistral, Qwen2/2.5, Qwen3 and BERT.

Each family is a table of rules: one of our tensors ← one or more of theirs. Several of theirs are
concatenated along the output dimension (our attention keeps q, k, v in one `qkv` matrix; our SwiGLU
keeps gate and up in one `up` matrix), and GPT-2's Conv1D weights are stored transposed. Exporting
runs the same table backwards: split, transpose back. Nothing else differs between the families:
their math is the same decoder (gpt.py) or encoder (bert.py) under different config flags.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmforge.config import ModelConfig
from lmforge.errors import CheckpointError, ConfigError
from lmforge.model.bert import Encoder, EncoderConfig
from lmforge.model.gpt import GPT, Rope
from lmforge.model.tensorfile import TensorSource

DECODERS = ("gpt2", "llama", "mistral", "qwen2", "qwen3")
SUPPORTED = (*DECODERS, "bert")
ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "bert": "BertModel"}
# Tensors in HF files that are not weights (cached buffers) or heads we do not carry.
IGNORED = re.compile(r"(\.attn\.(masked_)?bias|rotary_emb\.inv_freq|embeddings\.position_ids)$")
DROPPED_HEADS = re.compile(r"^(cls|classifier|qa_outputs)\.")

AnyConfig = ModelConfig | EncoderConfig


# ---------------------------------------------------------------------------------------------- configs

def _require(hf: dict[str, Any], key: str, source: str) -> Any:
    if hf.get(key) is None:
        raise ConfigError(f"{source}: config.json has no {key!r}")
    return hf[key]


def _refuse(condition: bool, source: str, what: str) -> None:
    if condition:
        raise ConfigError(f"{source}: {what} is not supported by lmforge's importer")


def _rope(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """rope_theta and scaling from either layout: transformers ≥ 5 nests both in `rope_parameters`."""
    params = dict(hf.get("rope_parameters") or {})
    theta = float(hf.get("rope_theta") or params.pop("rope_theta", None) or 10000.0)
    params.pop("rope_theta", None)
    scaling = hf.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    if scaling and scaling.get("rope_type", scaling.get("type")) == "default":
        scaling = None
    return theta, scaling


def config_from_hf(hf: dict[str, Any], source: str = "config.json") -> AnyConfig:
    """Our config for an HF config.json, or a ConfigError naming what does not fit."""
    kind = hf.get("model_type")
    if kind not in SUPPORTED:
        raise ConfigError(f"{source}: model_type={kind!r} is not supported; lmforge imports {', '.join(SUPPORTED)} "
                          "and the encoder-decoders marian, t5")
    if kind == "bert":
        _refuse(hf.get("position_embedding_type", "absolute") != "absolute", source,
                f"position_embedding_type={hf.get('position_embedding_type')!r}")
        act = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
        _refuse(hf.get("hidden_act", "gelu") not in act, source, f"hidden_act={hf.get('hidden_act')!r}")
        return EncoderConfig(
            vocab_size=_require(hf, "vocab_size", source), hidden_size=_require(hf, "hidden_size", source),
            num_hidden_layers=_require(hf, "num_hidden_layers", source),
            num_attention_heads=_require(hf, "num_attention_heads", source),
            intermediate_size=hf.get("intermediate_size"),
            max_position_embeddings=hf.get("max_position_embeddings", 512),
            type_vocab_size=hf.get("type_vocab_size", 2), layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
            hidden_act=act[hf.get("hidden_act", "gelu")], pad_token_id=hf.get("pad_token_id") or 0,
            initializer_range=hf.get("initializer_range", 0.02))
    if kind == "gpt2":
        act = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
        _refuse(hf.get("activation_function", "gelu_new") not in act, source,
                f"activation_function={hf.get('activation_function')!r}")
        _refuse(bool(hf.get("scale_attn_by_inverse_layer_idx")), source, "scale_attn_by_inverse_layer_idx")
        _refuse(hf.get("scale_attn_weights") is False, source, "scale_attn_weights=false")
        _refuse(bool(hf.get("add_cross_attention")), source, "add_cross_attention")
        return ModelConfig(
            vocab_size=_require(hf, "vocab_size", source), hidden_size=_require(hf, "n_embd", source),
            num_hidden_layers=_require(hf, "n_layer", source), num_attention_heads=_require(hf, "n_head", source),
            intermediate_size=hf.get("n_inner"), max_position_embeddings=hf.get("n_positions", 1024),
            norm="layernorm", norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            mlp=act[hf.get("activation_function", "gelu_new")], position="learned", bias=True,
            tie_word_embeddings=hf.get("tie_word_embeddings", True), family="gpt2",
            initializer_range=hf.get("initializer_range", 0.02))
    _refuse(hf.get("hidden_act", "silu") != "silu", source, f"hidden_act={hf.get('hidden_act')!r}")
    _refuse(bool(hf.get("mlp_bias")), source, "mlp_bias=true")
    _refuse(kind != "qwen2" and bool(hf.get("attention_bias")), source, "attention_bias=true")
    _refuse(bool(hf.get("use_sliding_window")), source, "use_sliding_window=true (Qwen2's per-layer windows)")
    _refuse(hf.get("pretraining_tp", 1) != 1, source, f"pretraining_tp={hf.get('pretraining_tp')}")
    theta, scaling = _rope(hf)
    heads = _require(hf, "num_attention_heads", source)
    return ModelConfig(
        vocab_size=_require(hf, "vocab_size", source), hidden_size=_require(hf, "hidden_size", source),
        num_hidden_layers=_require(hf, "num_hidden_layers", source), num_attention_heads=heads,
        num_key_value_heads=hf.get("num_key_value_heads") or heads, head_dim=hf.get("head_dim"),
        intermediate_size=_require(hf, "intermediate_size", source),
        max_position_embeddings=hf.get("max_position_embeddings", 2048), norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6), mlp="swiglu", position="rope", rope_theta=theta,
        rope_scaling=scaling, sliding_window=hf.get("sliding_window") if kind == "mistral" else None,
        qkv_bias=kind == "qwen2", qk_norm=kind == "qwen3", tie_word_embeddings=hf.get("tie_word_embeddings", False),
        family=kind, initializer_range=hf.get("initializer_range", 0.02))


def hf_family(config: AnyConfig) -> str:
    """Which HF architecture can hold this config exactly, or a ConfigError saying why none can."""
    if isinstance(config, EncoderConfig):
        return "bert"
    c = config
    if c.position == "learned":
        if c.norm != "layernorm" or c.mlp not in ("gelu", "gelu_tanh") or not c.bias:
            raise ConfigError("only GPT-2-shaped models (LayerNorm, GELU, biases) with learned positions export "
                              f"to Hugging Face; this one has norm={c.norm}, mlp={c.mlp}, bias={c.bias}")
        return "gpt2"
    if c.norm != "rmsnorm" or c.mlp != "swiglu" or c.bias:
        raise ConfigError("RoPE models export as Llama/Mistral/Qwen, which need norm=rmsnorm, mlp=swiglu, bias=false; "
                          f"this one has norm={c.norm}, mlp={c.mlp}, bias={c.bias}")
    if c.qk_norm and c.qkv_bias:
        raise ConfigError("no Hugging Face architecture has both qk_norm and qkv_bias")
    if c.qk_norm:
        return "qwen3"
    if c.qkv_bias:
        return "qwen2"
    if c.sliding_window:
        return "mistral"
    return c.family if c.family in ("llama", "mistral") else "llama"


def config_to_hf(config: AnyConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    family = hf_family(config)
    dtype_name = str(dtype).removeprefix("torch.")
    if isinstance(config, EncoderConfig):
        act = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}[config.hidden_act]
        return {"architectures": [ARCHITECTURES[family]], "model_type": "bert", "vocab_size": config.vocab_size,
                "hidden_size": config.hidden_size, "num_hidden_layers": config.num_hidden_layers,
                "num_attention_heads": config.num_attention_heads, "intermediate_size": config.intermediate_size,
                "max_position_embeddings": config.max_position_embeddings, "type_vocab_size": config.type_vocab_size,
                "layer_norm_eps": config.layer_norm_eps, "hidden_act": act, "pad_token_id": config.pad_token_id,
                "position_embedding_type": "absolute", "initializer_range": config.initializer_range,
                "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "torch_dtype": dtype_name}
    c = config
    if family == "gpt2":
        return {"architectures": [ARCHITECTURES[family]], "model_type": "gpt2", "vocab_size": c.vocab_size,
                "n_embd": c.hidden_size, "n_layer": c.num_hidden_layers, "n_head": c.num_attention_heads,
                "n_inner": c.intermediate_size, "n_positions": c.max_position_embeddings,
                "layer_norm_epsilon": c.norm_eps, "activation_function": "gelu" if c.mlp == "gelu" else "gelu_new",
                "tie_word_embeddings": c.tie_word_embeddings, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
                "attn_pdrop": 0.0, "initializer_range": c.initializer_range, "torch_dtype": dtype_name}
    out = {"architectures": [ARCHITECTURES[family]], "model_type": family, "vocab_size": c.vocab_size,
           "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
           "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
           "num_key_value_heads": c.num_key_value_heads, "head_dim": c.head_dim,
           "max_position_embeddings": c.max_position_embeddings, "rms_norm_eps": c.norm_eps, "hidden_act": "silu",
           "rope_theta": c.rope_theta, "rope_scaling": c.rope_scaling, "tie_word_embeddings": c.tie_word_embeddings,
           "attention_dropout": 0.0, "initializer_range": c.initializer_range, "torch_dtype": dtype_name}
    if family == "mistral":
        out["sliding_window"] = c.sliding_window
    if family in ("llama", "qwen3"):
        out.update(attention_bias=False, mlp_bias=False)
    if family in ("qwen2", "qwen3"):
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=c.num_hidden_layers)
    return out


# ------------------------------------------------------------------------------------------------ rules

@dataclass(frozen=True)
class Rule:
    """Our tensor `ours` is their tensors `theirs` concatenated on dim 0 (transposed first for Conv1D)."""

    ours: str
    theirs: tuple[str, ...]
    split: tuple[int, ...] | None = None  # sizes of `theirs` along dim 0, to split on export
    transpose: bool = False
    optional: bool = False  # absent in some checkpoints (BERT's pooler): zeros on import


def rules(config: AnyConfig, prefix: str = "") -> list[Rule]:
    """Every tensor of our model and where it comes from in an HF checkpoint of `config`'s family."""
    family = hf_family(config)
    p = prefix
    out: list[Rule] = []
    if family == "bert":
        e = "embeddings."
        out += [Rule("embed.weight", (f"{p}{e}word_embeddings.weight",)),
                Rule("pos_embed.weight", (f"{p}{e}position_embeddings.weight",)),
                Rule("type_embed.weight", (f"{p}{e}token_type_embeddings.weight",)),
                Rule("embed_norm.weight", (f"{p}{e}LayerNorm.weight",)),
                Rule("embed_norm.bias", (f"{p}{e}LayerNorm.bias",))]
        C = config.hidden_size
        for i in range(config.num_hidden_layers):
            h, o = f"{p}encoder.layer.{i}.", f"blocks.{i}."
            for kind in ("weight", "bias"):
                qkv_names = tuple(f"{h}attention.self.{n}.{kind}" for n in ("query", "key", "value"))
                out += [
                    Rule(f"{o}attn.qkv.{kind}", qkv_names, split=(C, C, C)),
                    Rule(f"{o}attn.proj.{kind}", (f"{h}attention.output.dense.{kind}",)),
                    Rule(f"{o}attn_norm.{kind}", (f"{h}attention.output.LayerNorm.{kind}",)),
                    Rule(f"{o}mlp.up.{kind}", (f"{h}intermediate.dense.{kind}",)),
                    Rule(f"{o}mlp.down.{kind}", (f"{h}output.dense.{kind}",)),
                    Rule(f"{o}mlp_norm.{kind}", (f"{h}output.LayerNorm.{kind}",))]
        return [*out, Rule("pooler.weight", (f"{p}pooler.dense.weight",), optional=True),
                Rule("pooler.bias", (f"{p}pooler.dense.bias",), optional=True)]
    c = config
    if family == "gpt2":
        out += [Rule("embed.weight", (f"{p}wte.weight",)), Rule("pos_embed.weight", (f"{p}wpe.weight",))]
        for i in range(c.num_hidden_layers):
            h, o = f"{p}h.{i}.", f"blocks.{i}."
            for kind in ("weight", "bias"):
                conv = kind == "weight"  # Conv1D keeps weights as [in, out]
                out += [Rule(f"{o}attn_norm.{kind}", (f"{h}ln_1.{kind}",)),
                        Rule(f"{o}attn.qkv.{kind}", (f"{h}attn.c_attn.{kind}",), transpose=conv),
                        Rule(f"{o}attn.proj.{kind}", (f"{h}attn.c_proj.{kind}",), transpose=conv),
                        Rule(f"{o}mlp_norm.{kind}", (f"{h}ln_2.{kind}",)),
                        Rule(f"{o}mlp.up.{kind}", (f"{h}mlp.c_fc.{kind}",), transpose=conv),
                        Rule(f"{o}mlp.down.{kind}", (f"{h}mlp.c_proj.{kind}",), transpose=conv)]
        out += [Rule("norm.weight", (f"{p}ln_f.weight",)), Rule("norm.bias", (f"{p}ln_f.bias",))]
    else:
        qkv = (c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim,
               c.num_key_value_heads * c.head_dim)
        out.append(Rule("embed.weight", (f"{p}embed_tokens.weight",)))
        for i in range(c.num_hidden_layers):
            h, o = f"{p}layers.{i}.", f"blocks.{i}."
            out += [Rule(f"{o}attn_norm.weight", (f"{h}input_layernorm.weight",)),
                    Rule(f"{o}attn.qkv.weight", tuple(f"{h}self_attn.{n}_proj.weight" for n in "qkv"), split=qkv),
                    Rule(f"{o}attn.proj.weight", (f"{h}self_attn.o_proj.weight",)),
                    Rule(f"{o}mlp_norm.weight", (f"{h}post_attention_layernorm.weight",)),
                    Rule(f"{o}mlp.up.weight", (f"{h}mlp.gate_proj.weight", f"{h}mlp.up_proj.weight"),
                         split=(c.intermediate_size, c.intermediate_size)),
                    Rule(f"{o}mlp.down.weight", (f"{h}mlp.down_proj.weight",))]
            if c.qkv_bias:
                out.append(Rule(f"{o}attn.qkv.bias", tuple(f"{h}self_attn.{n}_proj.bias" for n in "qkv"), split=qkv))
            if c.qk_norm:
                out += [Rule(f"{o}attn.q_norm.weight", (f"{h}self_attn.q_norm.weight",)),
                        Rule(f"{o}attn.k_norm.weight", (f"{h}self_attn.k_norm.weight",))]
        out.append(Rule("norm.weight", (f"{p}norm.weight",)))
    if not c.tie_word_embeddings:
        out.append(Rule("lm_head.weight", ("lm_head.weight",)))
    return out


def detect_prefix(config: AnyConfig, names: set[str]) -> str:
    """HF saves the base model bare or under its task model's attribute (`model.`, `transformer.`, `bert.`)."""
    family = hf_family(config)
    probe = {"gpt2": "wte.weight", "bert": "embeddings.word_embeddings.weight"}.get(family, "embed_tokens.weight")
    for prefix in ("", "model.", "transformer.", "bert.", "model.language_model."):
        if prefix + probe in names:
            return prefix
    raise CheckpointError(f"no {probe!r} among the checkpoint's tensors (found e.g. {sorted(names)[:6]}); "
                          f"is this really a {family} checkpoint?")


# ----------------------------------------------------------------------------------------------- import

def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t if dtype is None or not t.is_floating_point() else t.to(dtype)


def import_plan(config: AnyConfig, source: TensorSource) -> tuple[list[Rule], list[str]]:
    """The rules this checkpoint satisfies, after checking every tensor is accounted for and fits.

    Returns the rules and the head tensors we drop (e.g. BERT's masked-LM head), for a notice.
    """
    names = set(source.names())
    prefix = detect_prefix(config, names)
    plan = rules(config, prefix)
    expected = {name for r in plan for name in r.theirs}
    missing = sorted(n for r in plan if not r.optional for n in r.theirs if n not in names)
    # Some checkpoints store a tied head anyway; it must equal the embedding, so it is simply not read.
    tied_copy = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    dropped = sorted(n for n in names - expected if DROPPED_HEADS.match(n.removeprefix(prefix)))
    unexpected = sorted(n for n in names - expected - tied_copy - set(dropped) if not IGNORED.search(n))
    if missing or unexpected:
        raise CheckpointError(
            f"{source.directory}: tensors do not match config.json for {hf_family(config)}: "
            f"missing {missing[:8]}{' …' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{' …' if len(unexpected) > 8 else ''}")
    return plan, dropped


def import_tensors(config: AnyConfig, source: TensorSource, plan: list[Rule], dtype: torch.dtype | None = None,
                   expected_shapes: dict[str, tuple[int, ...]] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Our tensors one at a time, each built from its HF sources (read, transposed, concatenated, cast)."""
    for rule in plan:
        if rule.optional and any(n not in source for n in rule.theirs):
            shape = expected_shapes[rule.ours] if expected_shapes else None
            if shape is None:
                continue
            yield rule.ours, torch.zeros(shape, dtype=dtype or torch.float32)
            continue
        if expected_shapes is not None:
            _check_shapes(rule, source, expected_shapes[rule.ours])
        if rule.transpose:  # GPT-2's Conv1D: one tensor, stored [in, out]
            yield rule.ours, _cast(source.read(rule.theirs[0]).t().contiguous(), dtype)
            continue
        # Read each part straight into its rows of the fused tensor: no temporaries to fragment the heap.
        shape = (sum(source.shape(n)[0] for n in rule.theirs), *source.shape(rule.theirs[0])[1:])
        tensor = torch.empty(shape, dtype=source.dtype(rule.theirs[0]))
        row = 0
        for name in rule.theirs:
            rows = source.shape(name)[0]
            source.read(name, tensor[row:row + rows])
            row += rows
        yield rule.ours, _cast(tensor, dtype)


def _check_shapes(rule: Rule, source: TensorSource, ours: tuple[int, ...]) -> None:
    """Each HF tensor against the shape config.json implies for it, before reading any bytes."""
    sizes = rule.split or (ours[0],)
    for name, size in zip(rule.theirs, sizes):
        want = (size, *ours[1:])
        want = tuple(reversed(want)) if rule.transpose else want
        if source.shape(name) != want:
            raise CheckpointError(f"{source.directory}: {name} has shape {source.shape(name)} but config.json "
                                  f"implies {want} (for our {rule.ours})")


def build_model(config: AnyConfig) -> torch.nn.Module:
    return Encoder(config) if isinstance(config, EncoderConfig) else GPT(config)


def expected_shapes(config: AnyConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = build_model(config)
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def load_hf_model(directory: Path, dtype: torch.dtype | None = None) -> tuple[torch.nn.Module, AnyConfig]:
    """Our model holding an HF checkpoint's weights, built without a second copy of them in memory."""
    directory = Path(directory)
    config = config_from_hf(read_hf_config(directory), str(directory / "config.json"))
    source = TensorSource(directory)
    plan, _ = import_plan(config, source)
    with torch.device("meta"):
        model = build_model(config)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    state = dict(import_tensors(config, source, plan, dtype or torch.float32, shapes))
    model.load_state_dict(state, strict=False, assign=True)
    if isinstance(model, GPT):
        if config.tie_word_embeddings:
            model.lm_head.weight = model.embed.weight
        if model.rope is not None:  # a buffer built on the meta device: compute it for real
            model.rope = Rope(config)
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise CheckpointError(f"{directory}: no weights for {still_meta[:5]}")
    return model.eval(), config


def read_hf_config(directory: Path) -> dict[str, Any]:
    path = Path(directory) / "config.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{directory}: no config.json") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def is_hf_checkpoint(directory: Path) -> bool:
    path = Path(directory) / "config.json"
    if not path.is_file():
        return False
    try:
        kind = json.loads(path.read_text()).get("model_type")
    except (json.JSONDecodeError, AttributeError):
        return False
    return kind is not None and not str(kind).startswith("lmforge")


# ----------------------------------------------------------------------------------------------- export

def export_tensors(config: AnyConfig, source: TensorSource, dtype: torch.dtype | None = None,
                   ) -> Iterator[tuple[str, torch.Tensor]]:
    """HF tensors one at a time from our checkpoint: split fused matrices, transpose Conv1D weights back."""
    for rule in rules(config, _export_prefix(config)):
        tensor = _cast(source.read(rule.ours), dtype)
        parts = list(tensor.split(list(rule.split), dim=0)) if rule.split else [tensor]
        for name, part in zip(rule.theirs, parts):
            yield name, (part.t() if rule.transpose else part).contiguous()


def export_layout(config: AnyConfig, source: TensorSource, dtype: torch.dtype | None = None,
                  ) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    layout = []
    for rule in rules(config, _export_prefix(config)):
        shape, stored = source.shape(rule.ours), source.dtype(rule.ours)
        out_dtype = dtype if dtype is not None and stored.is_floating_point else stored
        sizes = rule.split or (shape[0],)
        for name, size in zip(rule.theirs, sizes):
            part = (size, *shape[1:])
            layout.append((name, tuple(reversed(part)) if rule.transpose else part, out_dtype))
    return layout


def _export_prefix(config: AnyConfig) -> str:
    # The names transformers' *ForCausalLM / BertModel classes save under.
    return {"gpt2": "transformer.", "bert": ""}.get(hf_family(config), "model.")

