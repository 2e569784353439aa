"""`lmforge eval perplexity`: perplexity and bits per byte of a model on held-out text.

The scoring itself (sliding windows, bits per byte) is `lmforge.infer.score`, which `LM.perplexity` calls too.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal

from lmforge.lm import LM, load


def perplexity(
    model: Path,
    data: Path,
    *,
    text_field: str = "text",
    block_size: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    dtype: Literal["float32", "bfloat16"] = "float32",
    device: str | None = None,
    progress: bool = True,
) -> dict[str, float | int]:
    """Perplexity and bits per byte of a model on held-out text.

    Args:
        model: Checkpoint directory.
        data: A text, JSONL, CSV/TSV or Parquet file (optionally .gz/.zst), a folder of them, or a packed
            dataset (its val split).
        text_field: The JSONL field / CSV or Parquet column holding the text.
        block_size: Tokens per window (default: the model's context).
        stride: Tokens the window advances; every token gets at least block_size − stride tokens of
            context (default: half the block).
        batch_size: Windows scored together.
        dtype: "float32" (default, for numbers comparable across machines) or "bfloat16" (autocast; the old
            spellings `--precision 32` / `bf16-mixed` still work).
        device: "cpu", "cuda", ...; default CUDA when present.
        progress: Show the progress line.

    Returns:
        perplexity, nll (nats per token), bits_per_byte, tokens and bytes scored, block_size, stride.
    """
    lm = model if isinstance(model, LM) else load(model, device=device)
    lm.require_decoder("eval perplexity")
    result = lm.perplexity(data, field=text_field, block_size=block_size, stride=stride, batch_size=batch_size,
                           precision="bf16-mixed" if dtype == "bfloat16" else "32", progress=progress)
    if progress:
        print(f"perplexity {result['perplexity']:.3f} | bits/byte {result['bits_per_byte']:.4f} | "
              f"{result['tokens']:,} tokens", file=sys.stderr)
    return result
