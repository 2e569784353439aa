"""`lmforge compress report`: what compression bought and what it cost, side by side.

For each model directory: weight file size, parameters (a quantized matrix counts its logical out×in weights;
zeros of unstructured pruning are counted apart), batch-1 greedy decode tokens/s through the engine, and
perplexity on the same held-out text. One markdown table and one PNG with a panel per measure.
"""

from __future__ import annotations

import itertools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from lmforge.compress.quantize import weights_bytes
from lmforge.errors import ConfigError
from lmforge.infer.decode import SamplingParams, generate_tokens
from lmforge.io import atomic_path
from lmforge.lm import load
from lmforge.model.quant import QUANTIZED


def count_weights(model: nn.Module) -> tuple[int, int]:
    """(parameters, how many are exactly zero): quantized layers count out×in weights (+ bias), never their
    scales or packed bytes, and a quantized head that copies a tied embedding counts once, with the embedding;
    a zero is counted only in float tensors (an int8 zero is a rounded small weight)."""
    quantized = [m for m in model.modules() if isinstance(m, QUANTIZED)]
    skip = {id(p) for m in quantized for p in m.parameters()}
    head = getattr(model, "lm_head", None)
    if getattr(model.config, "tie_word_embeddings", False) and isinstance(head, QUANTIZED):
        quantized.remove(head)
    total = sum(m.out_features * m.in_features + (0 if m.bias is None else m.out_features) for m in quantized)
    zeros, seen = 0, set()
    for p in model.parameters():
        if id(p) in skip or id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        zeros += int((p == 0).sum()) if p.dim() >= 2 else 0
    return total, zeros


def decode_step_times(model: nn.Module, *, new_tokens: int = 64, prompt_tokens: int = 16) -> list[float]:
    """Seconds between consecutive new tokens of one batch-1 greedy decode through the engine (the prefill and
    the first token are not among them)."""
    prompt = torch.randint(0, model.config.vocab_size, (prompt_tokens,), generator=torch.Generator().manual_seed(0))
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0, stop_at_eos=False)
    stamps = [time.perf_counter() for _token in generate_tokens(model, prompt.tolist(), params)]
    return [b - a for a, b in itertools.pairwise(stamps)]


def decode_tokens_per_second(model: nn.Module, *, new_tokens: int = 64, rounds: int = 3) -> float:
    """Batch-1 greedy decode speed: 1 / median step time pooled over rounds, so a burst of load from another
    process does not decide it."""
    return 1 / statistics.median([t for _ in range(rounds) for t in decode_step_times(model, new_tokens=new_tokens)])


def _describe(path: Path) -> str:
    config = json.loads((Path(path) / "config.json").read_text())
    quant = config.get("quantization")
    if not quant:
        return "full precision"
    schemes = sorted(set(quant["layers"].values()))
    group = f" g{quant['group_size']}" if quant.get("group_size") and "int4" in schemes else ""
    return "/".join(schemes) + group + f" ({quant.get('dtype', '?')} activations)"


def measure(path: Path, data: Path, *, dtype: torch.dtype | None, new_tokens: int, rounds: int,
            block_size: int | None) -> dict[str, Any]:
    """One row of the report for one model directory."""
    lm = load(path, device="cpu", dtype=dtype)
    params, zeros = count_weights(lm.model)
    ppl = lm.perplexity(data, block_size=block_size, progress=False)
    return {"model": str(path), "what": _describe(path), "size_mb": weights_bytes(path) / 1e6,
            "parameters": params, "zeros": zeros,
            "tokens_per_s": decode_tokens_per_second(lm.model, new_tokens=new_tokens, rounds=rounds),
            "perplexity": ppl["perplexity"], "tokens_scored": ppl["tokens"]}


def table(rows: list[dict[str, Any]]) -> str:
    base = rows[0]
    lines = ["| model | what | size (MB) | parameters | zeros | decode tok/s (batch 1) | perplexity |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        ratio = r["tokens_per_s"] / base["tokens_per_s"]
        speed = f"{r['tokens_per_s']:.1f}" + ("" if r is base else f" ({ratio:.2f}x)")
        ppl = f"{r['perplexity']:.3f}" + ("" if r is base else f" ({r['perplexity'] - base['perplexity']:+.3f})")
        lines.append(f"| {Path(r['model']).name} | {r['what']} | {r['size_mb']:.2f} | {r['parameters'] / 1e6:.3f}M "
                     f"| {r['zeros'] / max(r['parameters'], 1):.1%} | {speed} | {ppl} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [Path(r["model"]).name for r in rows]
    panels = [("size_mb", "weights (MB)"), ("tokens_per_s", "decode tokens/s (batch 1)"), ("perplexity", "perplexity")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 0.5 * len(rows) + 1.8), sharey=True)
    for ax, (key, label) in zip(axes, panels):
        values = [r[key] for r in rows]
        ax.barh(names, values, color=["#777777"] + ["#3b75af"] * (len(rows) - 1))
        ax.set_xlabel(label)
        for y, v in enumerate(values):
            ax.text(v, y, f" {v:.4g}", va="center", fontsize=8)
        ax.margins(x=0.25)
    axes[0].invert_yaxis()
    fig.suptitle("compression: size, speed and perplexity (first row = reference)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def compress_report(
    models: list[Path],
    data: Path,
    out: Path = Path("compress_report.md"),
    *,
    dtype: Literal["bfloat16", "float32", "auto"] = "bfloat16",
    new_tokens: int = 64,
    rounds: int = 3,
    block_size: int | None = None,
) -> str:
    """Compare model directories: weight size, parameters, batch-1 decode tokens/s and perplexity.

    The first model is the reference the others are compared with. Speeds are measured on this machine's CPU,
    one model at a time; perplexity is scored on the same text with the same windows for all.

    Args:
        models: Checkpoint directories, the reference first (e.g. runs/x runs/x-int8 runs/x-int4 runs/x-pruned).
        data: Held-out text (a text, JSONL, CSV or Parquet file, a folder, or a packed dataset's val split).
        out: Markdown file to write; the plot goes beside it with the suffix .png.
        dtype: Float dtype to load full-precision models in: "bfloat16" (the decode dtype to beat on CPU),
            "float32", or "auto" (as each checkpoint says; a quantized one runs in the dtype it was made for).
        new_tokens: Tokens generated per timing round.
        rounds: Timing rounds per model.
        block_size: Perplexity window (default: each model's context).

    Returns:
        The markdown table.
    """
    if not models:
        raise ConfigError("give at least one model directory (the reference first)")
    cast = None if dtype == "auto" else getattr(torch, dtype)
    rows = []
    for path in models:
        print(f"measuring {path} ...", file=sys.stderr)
        rows.append(measure(Path(path), Path(data), dtype=cast, new_tokens=new_tokens, rounds=rounds,
                            block_size=block_size))
    markdown = table(rows)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    note = (f"\n\nPerplexity on {data} ({rows[0]['tokens_scored']:,} tokens); decode: greedy, batch 1, {new_tokens} "
            f"new tokens × {rounds} rounds, median step, {torch.get_num_threads()} CPU threads.\n")
    with atomic_path(out) as tmp:
        Path(tmp).write_text(markdown + note)
    plot(rows, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}", file=sys.stderr)
    return markdown
