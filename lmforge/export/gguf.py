"""`lmforge export gguf`: a checkpoint as one GGUF file, the format llama.cpp (and what is built on it) loads.

GGUF (ggml's format, https://github.com/ggml-org/ggml/blob/master/docs/gguf.md) holds the hyper-parameters
and the tokenizer as typed key/value metadata and the weights as named tensors, each in its own type. We
write it with the `gguf` package, llama.cpp's own writer: its constants name every key and tensor and its
numpy quantizers make the Q8_0 / Q4_0 blocks, so nothing here knows a byte of the format.

What is ours to get right (llama.cpp's `convert_hf_to_gguf.py` does the same for HF folders):

- the architecture: GPT-2-shaped models are `gpt2`; RoPE models `llama`, `qwen2` (q/k/v bias) or `qwen3` (QK-norm);
- the rotary layout: llama.cpp's `llama` rotates adjacent pairs (x0, x1), (x2, x3), … (Meta's original code),
  while we and HF rotate the two halves of a head (x_i, x_{i+d/2}). Reordering the rows of W_q and W_k inside
  each head turns one into the other. llama.cpp's `qwen2` / `qwen3` rotate halves ("NEOX") like us: no reorder;
- the tokenizer: byte-level BPE tokens with their types, the merges, and the name of a pre-tokenizer (the regex
  that splits text before BPE) that llama.cpp implements.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from lmforge.checkpoint import load_decoder
from lmforge.config import ModelConfig
from lmforge.errors import CheckpointError, ConfigError
from lmforge.io import atomic_path
from lmforge.model.gpt import GPT
from lmforge.model.hf import hf_family
from lmforge.model.lora import merge_lora
from lmforge.tokenizer import Tokenizer

GGUFType = Literal["f32", "bf16", "q8_0", "q4_0"]

# The regexes of tokenizer.json pre-tokenizers and the names under which llama.cpp (src/llama-vocab.cpp)
# implements the same split. GPT-2's is implied by ByteLevel(use_regex=True), what `tokenizer train` writes.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
PRE_TOKENIZERS = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}


def export_gguf(
    model: Path,
    out: Path,
    *,
    type: GGUFType = "f32",
    overwrite: bool = False,
) -> Path:
    """Export a decoder as one GGUF file for llama.cpp (llama-cli, llama-server, llama-cpp-python, Ollama).

    GPT-2-shaped models are written as llama.cpp's `gpt2`, RoPE models as `llama`, `qwen2` (q/k/v bias) or
    `qwen3` (QK-norm), with the byte-level BPE tokenizer, its merges and special tokens. Norms and biases
    stay f32 in every type; q4_0 keeps the embedding and output matrices in q8_0 (llama.cpp's own
    quantizer also spends more bits on the output). Accepts our checkpoints, HF folders and LoRA runs
    (merged on the way).

    Args:
        model: A checkpoint directory (ours, a Hugging Face folder or a LoRA run).
        out: The .gguf file to write.
        type: Weight type of the matrices: f32 (exact), bf16, q8_0 (8-bit blocks of 32) or q4_0 (4-bit blocks).
        overwrite: Replace an existing `out`.

    Returns:
        The file written.
    """
    gguf = _require_gguf()
    model, out = Path(model), Path(out)
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out}: already exists; choose another --out or pass --overwrite true")
    loaded = load_decoder(model, dtype=torch.float32)
    if loaded.kind == "lora":
        merge_lora(loaded.model)
    net, config = loaded.model, loaded.config
    _check_plain(net, model)
    arch = gguf_architecture(config)
    if config.mlp == "gelu":
        print(f"note: {model} uses exact (erf) GELU; llama.cpp's gpt2 computes GELU's tanh approximation "
              "(through an fp16 table), so its logits differ from ours by about 1e-3", file=sys.stderr)
    writer_type = {"f32": gguf.LlamaFileType.ALL_F32, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                   "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[type]
    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_name(model.resolve().name)
        writer.add_file_type(writer_type)
        _write_hparams(writer, config, arch)
        _write_tokenizer(writer, loaded.tokenizer, config, loaded.generation_config)
        for name, array in _tensors(net, config, arch):
            qtype = _tensor_type(name, array, type)
            writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    print(f"exported {model} as GGUF {arch} ({type}) to {out} ({out.stat().st_size / 2**20:.1f} MiB)",
          file=sys.stderr)
    return out


def _require_gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise ConfigError("GGUF export needs the `gguf` package: pip install 'lmforge[export]'") from None
    return gguf


def gguf_architecture(config: ModelConfig) -> str:
    """llama.cpp's name for the architecture of `config`, or a ConfigError naming what it cannot run."""
    family = hf_family(config)  # refuses shapes no published architecture has
    if family == "mistral":
        raise ConfigError(f"sliding_window={config.sliding_window}: llama.cpp's llama architecture attends to the "
                          "whole context, so this Mistral-style model would compute other logits past the window; "
                          "GGUF export supports gpt2, llama, qwen2 and qwen3 shapes")
    if family in ("gpt2", "qwen2") and config.head_dim * config.num_attention_heads != config.hidden_size:
        raise ConfigError(f"head_dim={config.head_dim} × num_attention_heads={config.num_attention_heads} ≠ "
                          f"hidden_size={config.hidden_size}: llama.cpp's {family} needs them equal")
    if family == "gpt2" and config.num_key_value_heads != config.num_attention_heads:
        raise ConfigError(f"num_key_value_heads={config.num_key_value_heads}: llama.cpp's gpt2 has no grouped "
                          "K/V heads")
    scaling = (config.rope_scaling or {}).get("rope_type", (config.rope_scaling or {}).get("type"))
    if scaling == "llama3" and family != "llama":
        raise ConfigError(f"rope_scaling={config.rope_scaling}: llama.cpp reads llama3 RoPE scaling (rope_freqs) "
                          f"for the llama architecture only, not {family}")
    return family


def _check_plain(net: torch.nn.Module, source: Path) -> None:
    """Only plain float weights export: a quantized or otherwise wrapped model is refused by name."""
    if not isinstance(net, GPT):
        raise CheckpointError(f"{source}: holds a {type(net).__name__}, not a decoder GGUF can carry")
    with torch.device("meta"):
        expected = set(dict(GPT(net.config).named_parameters()))
    found = set(dict(net.named_parameters()))
    if found != expected:
        extra = sorted(found - expected)[:4]
        raise CheckpointError(f"{source}: weights {extra} are not plain float matrices (a quantized checkpoint?); "
                              "export the float checkpoint it came from and choose --type q8_0 or q4_0")


def _write_hparams(writer: Any, config: ModelConfig, arch: str) -> None:
    import gguf

    c = config
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_vocab_size(c.vocab_size)
    if arch == "gpt2":
        writer.add_layer_norm_eps(c.norm_eps)
        return
    writer.add_layer_norm_rms_eps(c.norm_eps)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_rope_dimension_count(c.head_dim)
    writer.add_key_length(c.head_dim)
    writer.add_value_length(c.head_dim)
    if c.rope_scaling and c.rope_scaling.get("rope_type", c.rope_scaling.get("type")) == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(c.rope_scaling["factor"]))


def _tensors(net: GPT, config: ModelConfig, arch: str) -> list[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array) for every weight, split and reordered as llama.cpp's graph for `arch` reads them.

    Arrays keep torch's [out, in] layout: GGUF lists dimensions innermost first, so ggml sees {in, out}.
    """
    from gguf import MODEL_TENSOR as T
    from gguf import TENSOR_NAMES

    def name(kind: Any, suffix: str = "weight", block: int | None = None) -> str:
        return f"{TENSOR_NAMES[kind].format(bid=block)}.{suffix}"

    c = config
    state = {k: v.detach().float().numpy() for k, v in net.state_dict().items()}
    out = [(name(T.TOKEN_EMBD), state["embed.weight"])]
    if arch == "gpt2":
        out.append((name(T.POS_EMBD), state["pos_embed.weight"]))
    q_rows, kv_rows = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    for i in range(c.num_hidden_layers):
        p = f"blocks.{i}."
        kinds = ("weight", "bias") if c.bias else ("weight",)
        out += [(name(T.ATTN_NORM, k, i), state[f"{p}attn_norm.{k}"]) for k in kinds]
        if arch == "gpt2":
            out += [(name(T.ATTN_QKV, k, i), state[f"{p}attn.qkv.{k}"]) for k in kinds]
        else:
            for k in ("weight", "bias") if c.qkv_bias else ("weight",):
                q, key, v = np.split(state[f"{p}attn.qkv.{k}"], [q_rows, q_rows + kv_rows])
                if arch == "llama":  # halves → adjacent pairs (see the module docstring)
                    q, key = _halves_to_pairs(q, c.num_attention_heads), _halves_to_pairs(key, c.num_key_value_heads)
                out += [(name(T.ATTN_Q, k, i), q), (name(T.ATTN_K, k, i), key), (name(T.ATTN_V, k, i), v)]
        if c.qk_norm:
            out += [(name(T.ATTN_Q_NORM, "weight", i), state[f"{p}attn.q_norm.weight"]),
                    (name(T.ATTN_K_NORM, "weight", i), state[f"{p}attn.k_norm.weight"])]
        out += [(name(T.ATTN_OUT, k, i), state[f"{p}attn.proj.{k}"]) for k in kinds]
        out += [(name(T.FFN_NORM, k, i), state[f"{p}mlp_norm.{k}"]) for k in kinds]
        if c.mlp == "swiglu":  # our `up` holds [gate; up] (gpt.py's MLP)
            gate, up = np.split(state[f"{p}mlp.up.weight"], 2)
            out += [(name(T.FFN_GATE, "weight", i), gate), (name(T.FFN_UP, "weight", i), up)]
        else:
            out += [(name(T.FFN_UP, k, i), state[f"{p}mlp.up.{k}"]) for k in kinds]
        out += [(name(T.FFN_DOWN, k, i), state[f"{p}mlp.down.{k}"]) for k in kinds]
    out += [(name(T.OUTPUT_NORM, k), state[f"norm.{k}"]) for k in ("weight", "bias") if f"norm.{k}" in state]
    if not c.tie_word_embeddings:  # llama.cpp reuses token_embd when `output` is absent
        out.append((name(T.OUTPUT), state["lm_head.weight"]))
    if c.rope_scaling and c.rope_scaling.get("rope_type", c.rope_scaling.get("type")) == "llama3":
        # llama.cpp divides each rotary frequency by its factor; ours are already scaled (gpt.py's scale_rope)
        base = 1.0 / c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.float32) / c.head_dim)
        out.append((name(T.ROPE_FREQS), (base / net.rope.inv_freq.float()).numpy()))
    return [(n, np.ascontiguousarray(a, dtype=np.float32)) for n, a in out]


def _halves_to_pairs(w: np.ndarray, heads: int) -> np.ndarray:
    """Rows of each head reordered [x_0..x_{d/2-1}, x_{d/2}..x_{d-1}] → [x_0, x_{d/2}, x_1, x_{d/2+1}, …]."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensor_type(name: str, array: np.ndarray, type: GGUFType) -> Any:
    """The ggml type of one tensor: vectors (norms, biases, rope factors) and position embeddings stay f32, as
    llama.cpp's converter keeps them; q4_0 keeps the embedding and output matrices at q8_0."""
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as Q

    if array.ndim < 2 or name.startswith("position_embd"):
        return Q.F32
    stored = "q8_0" if type == "q4_0" and name.split(".")[0] in ("token_embd", "output") else type
    qtype = {"f32": Q.F32, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[stored]
    block = GGML_QUANT_SIZES[qtype][0]
    if array.shape[-1] % block:
        raise ConfigError(f"--type {type}: {name} has rows of {array.shape[-1]} values, not a multiple of the "
                          f"{block}-value blocks {stored} stores; use --type f32 or bf16")
    return qtype


# ------------------------------------------------------------------------------------------------ tokenizer

def _write_tokenizer(writer: Any, tokenizer: Tokenizer, config: ModelConfig, generation: dict[str, Any]) -> None:
    """Tokens, types, merges, pre-tokenizer name and special ids, as llama.cpp's `gpt2` tokenizer model reads them."""
    import gguf

    spec = json.loads(tokenizer.hf.to_str())
    source = "tokenizer.json"
    if (spec.get("model") or {}).get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise ConfigError(f"{source}: model {spec.get('model', {}).get('type')!r} with decoder "
                          f"{(spec.get('decoder') or {}).get('type')!r}; GGUF export writes byte-level BPE "
                          "tokenizers (GPT-2, Llama 3, Qwen2 style) only")
    vocab = tokenizer.hf.get_vocab(with_added_tokens=True)
    if max(vocab.values()) >= config.vocab_size:
        raise ConfigError(f"{source}: token id {max(vocab.values())} ≥ vocab_size={config.vocab_size} of config.json")
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    tokens = [f"[PAD{i}]" for i in range(config.vocab_size)]
    types = [gguf.TokenType.UNUSED] * config.vocab_size
    for token, i in vocab.items():
        tokens[i] = token
        types[i] = (gguf.TokenType.NORMAL if i not in added else
                    gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(spec.get("pre_tokenizer"), source))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    eos = generation.get("eos_token_id", tokenizer.eos_id)
    eos = eos[0] if isinstance(eos, list) else eos
    for add, value in ((writer.add_bos_token_id, tokenizer.bos_id), (writer.add_eos_token_id, eos),
                       (writer.add_pad_token_id, tokenizer.pad_id)):
        if value is not None:
            add(value)
    writer.add_add_bos_token(tokenizer.add_bos)
    writer.add_add_eos_token(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _pre_tokenizer(pre: dict[str, Any] | None, source: str) -> str:
    """The llama.cpp pre-tokenizer implementing tokenizer.json's, or a ConfigError showing what it is."""
    steps = (pre or {}).get("pretokenizers", [pre]) if (pre or {}).get("type") == "Sequence" else [pre]
    steps = [s for s in steps if s]
    if len(steps) == 1 and steps[0]["type"] == "ByteLevel" and steps[0].get("use_regex", True):
        if steps[0].get("add_prefix_space"):
            raise ConfigError(f"{source}: ByteLevel(add_prefix_space=true) has no llama.cpp pre-tokenizer")
        return "gpt-2"
    if (len(steps) == 2 and steps[0]["type"] == "Split" and steps[1]["type"] == "ByteLevel"
            and not steps[1].get("use_regex", True) and steps[0].get("pattern", {}).get("Regex") in PRE_TOKENIZERS):
        return PRE_TOKENIZERS[steps[0]["pattern"]["Regex"]]
    raise ConfigError(f"{source}: pre_tokenizer {json.dumps(pre)[:200]} matches none that llama.cpp implements "
                      "here (GPT-2's ByteLevel regex, Llama 3's or Qwen2's Split regex)")
