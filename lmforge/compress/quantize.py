"""`lmforge compress quantize`: a checkpoint whose Linear weights are int8 or int4, decoded directly from them.

The result is an ordinary checkpoint directory (config.json records which layers are quantized) that
`lmforge.load`, `generate`, `serve` and `eval` open like any other; the layers and kernels live in
`lmforge.model.quant`, the file format in `lmforge.checkpoint`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal

import torch

from lmforge.checkpoint import check_out_dir, load_decoder, save_checkpoint
from lmforge.errors import ConfigError
from lmforge.model.gpt import GPT
from lmforge.model.quant import layout_of, quantize_model


def weights_bytes(directory: Path) -> int:
    """Bytes of a model directory's weight files (*.safetensors; an HF folder may be sharded)."""
    return sum(f.stat().st_size for f in Path(directory).glob("*.safetensors"))


def quantize(
    model: Path,
    out: Path = Path("runs/quantized"),
    *,
    scheme: Literal["int8", "int4"] = "int8",
    group_size: int = 128,
    head: Literal["int8", "int4", "none"] = "int8",
    dtype: Literal["bfloat16", "float32"] = "bfloat16",
) -> Path:
    """Store a decoder's Linear weights as int8 (one scale per output channel) or int4 (a scale and zero per group).

    Decoding reads every weight once per token, so a quarter (int8) or an eighth (int4) of the fp32 bytes
    decodes faster on a CPU; PyTorch's int8/int4 kernels run on the stored integers. Embeddings and norms keep
    full precision. A layer whose shape the kernels refuse (int8: in_features not a multiple of 16; int4:
    out_features not a multiple of 16 or in_features not one of group_size) falls back int4 → int8 → full
    precision, and is named in the summary.

    Args:
        model: Checkpoint directory (ours or a Hugging Face decoder); a LoRA run must be merged first.
        out: Directory to write; refused if it holds anything.
        scheme: "int8" (per output channel, symmetric) or "int4" (group-wise, asymmetric round-to-nearest).
        group_size: Inputs per int4 group: 32, 64, 128 or 256 (smaller = more accurate, more scales).
        head: How to store the output head (lm_head): "int8" (default: the head's errors go straight to the
            logits, and its int8 copy is what makes decoding of a tied-embedding model fast), "int4", or "none".
        dtype: Float dtype of everything else (embeddings, norms, scales) and of the activations:
            "bfloat16" is what the int kernels are fast with on CPU; "float32" for reference numbers.

    Returns:
        The quantized checkpoint directory.
    """
    out = Path(out)
    check_out_dir(out)
    loaded = load_decoder(Path(model), dtype=torch.float32)
    if loaded.kind != "decoder" or not isinstance(loaded.model, GPT):
        hint = f"merge it first (`lmforge merge-lora {model}`)" if loaded.kind == "lora" else "only Transformers"
        raise ConfigError(f"{model}: is a {loaded.kind} model; quantization applies to Transformer decoders: {hint}")
    if layout_of(loaded.model):
        raise ConfigError(f"{model}: is already quantized; quantize the full-precision checkpoint instead")
    done = quantize_model(loaded.model, scheme, group_size=group_size, head=None if head == "none" else head,
                          scale_dtype=getattr(torch, dtype))
    loaded.model.to(getattr(torch, dtype))
    save_checkpoint(out, loaded.model, loaded.config, tokenizer_dir=loaded.path,
                    generation_config=loaded.generation_config)
    counts: dict[str, list[str]] = {}
    for name, how in done.items():
        counts.setdefault(how, []).append(name)
    lines = [f"  {how}: {len(names)} layer(s)" + ("" if how in ("int8", "int4") else f" ({', '.join(names)})")
             for how, names in counts.items()]
    before, after = weights_bytes(model), weights_bytes(out)
    print(f"quantized {model} ({scheme}{f', group {group_size}' if scheme == 'int4' else ''}, head {head}):\n"
          + "\n".join(lines) + f"\n  weights {before / 1e6:.1f} MB -> {after / 1e6:.1f} MB; wrote {out}",
          file=sys.stderr)
    return out
