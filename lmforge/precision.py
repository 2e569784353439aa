"""Numeric precision: bf16 autocast where the hardware has fast bf16 matmuls, fp32 elsewhere.

On Sapphire Rapids and newer, bf16 matmuls run on AMX tiles, several times fp32's throughput;
without AMX or AVX512-BF16, CPU bf16 is emulated and slower than fp32, so it is not the default.
"""

from __future__ import annotations

import contextlib
import functools
import time
from pathlib import Path

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
