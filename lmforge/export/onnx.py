"""`lmforge export onnx`: a decoder as model.onnx with its KV cache as plain tensors, for onnxruntime.

An ONNX graph cannot hold our `KVCache` object, so the exported graph takes the cache in and gives it back:
inputs `input_ids` [batch, sequence], `attention_mask` [batch, past + sequence] (1 = real token, so
left-padded batches work: positions count real tokens, as in gpt.py) and `past_key_values.{i}.key/value`
[batch, kv_heads, past, head_dim]; outputs `logits` [batch, sequence, vocab] and `present.{i}.key/value`
[batch, kv_heads, past + sequence, head_dim], to feed back as the next step's past. These are the names
Hugging Face Optimum uses, so ONNX tooling that knows them finds its way. The first step passes a past of
length 0.

The graph is traced from the model itself (gpt.py, with a cache that concatenates instead of writing into
preallocated buffers), so there is no second implementation of the decoder to drift. We use the TorchScript
exporter (`dynamo=False`): traced at batch 2, a past of 3 and 4 new tokens it records batch and lengths as
symbolic sizes. torch 2.13's default torch.export-based exporter also works, but needs onnxscript and took
120 s for llama-tiny here against a few seconds. The TorchScript exporter lacks two things our model uses,
supplied below: RMSNorm (`aten::rms_norm`, spelled out as ONNX ops) and SDPA's `enable_gqa` (while tracing,
gpt.py takes its torch < 2.5 path, which repeats the K/V heads itself).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from torch import Tensor, nn

from lmforge.checkpoint import GENERATION_CONFIG, copy_tokenizer, load_decoder
from lmforge.errors import CheckpointError, ConfigError
from lmforge.io import atomic_path, atomic_write_json
from lmforge.model import gpt
from lmforge.model.gpt import GPT
from lmforge.model.hf import config_to_hf
from lmforge.model.lora import merge_lora

OPSET = 17  # LayerNormalization is a single op from 17; onnxruntime ≥ 1.14 runs it


class ConcatCache:
    """gpt.py's `KVCache` interface over given past tensors: each layer's keys/values come back as past + new,
    and what it returned is kept as that layer's `present`. Nothing is preallocated, so nothing is fixed-size."""

    def __init__(self, past: list[tuple[Tensor, Tensor]]) -> None:
        self.past = past
        self.present: list[tuple[Tensor, Tensor]] = []
        self.length = past[0][0].shape[2]  # a symbolic size while tracing: positions follow the past's length

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        past_k, past_v = self.past[layer]
        k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        self.present.append((k, v))
        return k, v

    def advance(self, n: int) -> None:
        """The length lives in the tensors; nothing to count."""


class FlatDecoder(nn.Module):
    """The decoder with the ONNX calling convention: (ids, mask, k0, v0, k1, v1, …) → (logits, k0', v0', …)."""

    def __init__(self, model: GPT) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor, *past: Tensor) -> tuple[Tensor, ...]:
        cache = ConcatCache(list(zip(past[0::2], past[1::2])))
        logits = self.model(input_ids, cache, attention_mask=attention_mask)
        return (logits, *(t for kv in cache.present for t in kv))


def io_names(layers: int) -> tuple[list[str], list[str]]:
    """The graph's input and output names, in order."""
    past = [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    present = [f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    return ["input_ids", "attention_mask", *past], ["logits", *present]


def export_onnx(
    model: Path,
    out: Path,
    *,
    overwrite: bool = False,
) -> Path:
    """Export a decoder as an ONNX folder for onnxruntime: model.onnx with its KV cache as inputs and outputs.

    The folder holds model.onnx (fp32; inputs input_ids, attention_mask, past_key_values.{i}.key/value;
    outputs logits, present.{i}.key/value; batch and lengths dynamic), config.json (Hugging Face layout),
    generation_config.json and the tokenizer files. Start with past tensors of length 0 and feed each
    step's `present` back as the next step's `past_key_values`. Accepts our checkpoints, HF folders and
    LoRA runs (merged on the way).

    Args:
        model: A checkpoint directory (ours, a Hugging Face folder or a LoRA run).
        out: The folder to write.
        overwrite: Replace the files of an earlier export in `out`.

    Returns:
        The folder written.
    """
    try:
        import onnx  # noqa: F401  (torch's exporter serializes through it)
    except ImportError:
        raise ConfigError("ONNX export needs the `onnx` package: pip install 'lmforge[export]'") from None
    model, out = Path(model), Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise CheckpointError(f"{out}: output directory is not empty; choose another --out or pass --overwrite true")
    loaded = load_decoder(model, dtype=torch.float32)
    if loaded.kind == "lora":
        merge_lora(loaded.model)
    if not isinstance(loaded.model, GPT):
        raise CheckpointError(f"{model}: holds a {type(loaded.model).__name__}, not a decoder ONNX export can trace")
    net, config = loaded.model.eval(), loaded.config
    hf_config = config_to_hf(config)  # refuses, by name, a shape no published architecture has
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "model.onnx") as tmp:
        trace(net, tmp)
    copy_tokenizer(loaded.path if loaded.base is None or (model / "tokenizer.json").exists() else loaded.base, out)
    atomic_write_json(out / GENERATION_CONFIG, loaded.generation_config)
    tok = loaded.tokenizer
    ids = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
    atomic_write_json(out / "config.json", {**hf_config, **{k: v for k, v in ids.items() if v is not None},
                                            "use_cache": True})
    print(f"exported {model} as ONNX (opset {OPSET}, fp32) to {out}", file=sys.stderr)
    return out


@torch.no_grad()
def trace(net: GPT, path: Path) -> None:
    """Write `net` as an ONNX graph at `path`, traced at batch 2, past 3, 4 new tokens (all dynamic).

    Tracing with sizes that differ from each other and from 1 keeps the exporter from folding any of them
    into a constant; the mask's padded first column makes the traced path the padding-aware one.
    """
    c = net.config
    batch, past_len, new = 2, 3, 4
    ids = torch.randint(0, c.vocab_size, (batch, new))
    mask = torch.ones(batch, past_len + new, dtype=torch.long)
    mask[1, 0] = 0
    past = [torch.randn(batch, c.num_key_value_heads, past_len, c.head_dim) for _ in range(2 * c.num_hidden_layers)]
    inputs, outputs = io_names(c.num_hidden_layers)
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "total_sequence"},
            "logits": {0: "batch", 1: "sequence"}}
    axes.update({name: {0: "batch", 2: "past_sequence"} for name in inputs[2:]})
    axes.update({name: {0: "batch", 2: "total_sequence"} for name in outputs[1:]})
    torch.onnx.register_custom_op_symbolic("aten::rms_norm", _rms_norm, OPSET)
    with warnings.catch_warnings(), mock.patch.object(gpt, "_SDPA_HAS_GQA", False):
        # The tracer warns where Python reads a size (the context-length check); the graph is still general.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", "You are using the legacy TorchScript", DeprecationWarning)  # chosen: above
        warnings.filterwarnings("ignore", "The feature will be removed", DeprecationWarning)
        torch.onnx.export(FlatDecoder(net), (ids, mask, *past), str(path), input_names=inputs, output_names=outputs,
                          dynamic_axes=axes, opset_version=OPSET, dynamo=False, do_constant_folding=True)


def _rms_norm(g: Any, x: Any, shape: Any, weight: Any, eps: Any) -> Any:
    """x / √(mean(x²) + ε) · weight over the last dimension (Zhang & Sennrich 2019) as ONNX ops, for
    `aten::rms_norm`, which the TorchScript exporter does not know (ONNX has RMSNormalization from opset 23 only).
    gpt.py's norms always pass ε; the mean is taken in the input's dtype (fp32 here)."""
    from torch.onnx import symbolic_helper

    epsilon = symbolic_helper._maybe_get_const(eps, "f")
    mean = g.op("ReduceMean", g.op("Mul", x, x), axes_i=[-1], keepdims_i=1)
    rms = g.op("Sqrt", g.op("Add", mean, g.op("Constant", value_t=torch.tensor(epsilon, dtype=torch.float32))))
    y = g.op("Div", x, rms)
    return y if symbolic_helper._is_none(weight) else g.op("Mul", y, weight)
