"""Numeric precision: bf16 autocast where the hardware has fast bf16 matmuls, fp32 elsewhere.

On Sapphire Rapids and newer, bf16 matmuls run on AMX tiles, several times fp32's throughput;
without AMX or AVX512-BF16, CPU bf16 is emulated and slower than fp32, so it is not the default.
"""

from __future__ import annotations

import contextlib
import functools
import time
from pathlib import Path
from typing import Literal

import torch


@functools.cache
def cpu_has_fast_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def default_precision(device: torch.device | str | None = None) -> str:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "32"
    return "bf16-mixed" if cpu_has_fast_bf16() else "32"


# What inference verbs (generate, chat, serve, eval, predict) compute in; training's counterpart is precision.
InferenceDtype = Literal["auto", "float32", "bfloat16"]


def inference_dtype(dtype: str | None, device: torch.device | str | None = None) -> torch.dtype | None:
    """The weights' dtype for `--dtype`: "auto" is bfloat16 where this device has fast bf16 matmuls (as
    training's default precision), else None: the checkpoint's own dtype (float32, or a quantized layout's)."""
    if dtype in (None, "auto"):
        return torch.bfloat16 if default_precision(device) == "bf16-mixed" else None
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@functools.cache
def measure_peak_flops(precision: str, device: torch.device, size: int = 2048, repeats: int = 6) -> float:
    """Achievable matmul FLOP/s on this device and thread count: the denominator of MFU.

    A measured peak, not a datasheet one, so MFU says how much of what this machine can do we use.
    """
    dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm-up: thread pool, kernel selection
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best
