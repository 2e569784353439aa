"""The int8 / int4 decode kernels of `qmatvec.c`, built once per machine with the system C compiler.

PyTorch's CPU weight-only kernels read int8 and int4 weights at about half the memory bandwidth here, so
halving or quartering the bytes bought 1.2x and 2x instead of 2x and 4x. `qmatvec.c` is a plain AVX-512
loop (three instructions per 16 int8 weights); it is compiled on first use with `cc -O3 -march=native
-fopenmp` into the user's cache (`$LMFORGE_CACHE`, else `~/.cache/lmforge`), keyed by the source and the CPU's
flags, and loaded with ctypes. Nothing here is needed for correctness: when there is no compiler, no AVX-512,
or `LMFORGE_KERNELS=0`, `available()` is False and quant.py keeps PyTorch's kernels.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import warnings
from functools import cache
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("qmatvec.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}


def cache_dir() -> Path:
    root = os.environ.get("LMFORGE_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "lmforge")
    return Path(root).expanduser() / "kernels"


def _cpu_flags() -> str:
    try:
        return next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def _build(compiler: str) -> Path:
    """The library for this source, compiler and CPU, compiled unless the cache already has it."""
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([compiler, *FLAGS, _cpu_flags()]).encode()).hexdigest()[:16]
    library = cache_dir() / f"qmatvec-{key}.so"
    if not library.exists():
        library.parent.mkdir(parents=True, exist_ok=True)
        partial = library.with_name(f".{library.name}.{os.getpid()}")
        try:
            subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(partial)], check=True, capture_output=True,
                           text=True, timeout=120)
            os.replace(partial, library)  # atomic: another process building the same key gets a whole file
        finally:
            partial.unlink(missing_ok=True)
    return library


@cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("LMFORGE_KERNELS", "1") == "0" or platform.machine() not in ("x86_64", "AMD64"):
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", "") or e
        warnings.warn(f"int8/int4 decode kernels not built ({detail}); using PyTorch's", stacklevel=2)
        return None
    if lib.lmforge_qmatvec_version() != 1:  # compiled without AVX-512
        return None
    i64, ptr, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.lmforge_q8_matmul.argtypes = [ptr, i32, ptr, ptr, ptr, ptr, i32, i64, i64, i64, i32]
    lib.lmforge_q4_matmul.argtypes = [ptr, i32, ptr, ptr, ptr, ptr, ptr, i32, i64, i64, i64, i64, i32]
    return lib


def available() -> bool:
    """Whether the kernels run on this machine (built, AVX-512, not turned off)."""
    return _library() is not None


def takes(x: Tensor) -> bool:
    """Whether these kernels can multiply `x`: float32 or bfloat16 on the CPU, and the library is there."""
    return x.device.type == "cpu" and x.dtype in _DTYPES and available()


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _output(x: Tensor, out_features: int) -> tuple[Tensor, Tensor, int]:
    """(x contiguous, the output [..., out_features] in x's dtype, rows); no reshapes: this runs per layer per token."""
    x = x if x.is_contiguous() else x.contiguous()
    return x, x.new_empty(*x.shape[:-1], out_features), x.numel() // x.shape[-1]


def int8_matmul(x: Tensor, q: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    """x·(q·scale)ᵀ + bias with q int8 [out, in], scale and bias float32 [out]; x float32/bfloat16 [..., in]."""
    x, out, rows = _output(x, q.shape[0])
    dtype = _DTYPES[x.dtype]
    code = _library().lmforge_q8_matmul(x.data_ptr(), dtype, q.data_ptr(), scale.data_ptr(), _ptr(bias),
                                        out.data_ptr(), dtype, rows, q.shape[0], q.shape[1], torch.get_num_threads())
    if code:
        raise RuntimeError(f"lmforge_q8_matmul failed ({code}) for in_features={q.shape[1]}")
    return out


def int4_matmul(x: Tensor, packed: Tensor, scale: Tensor, zs: Tensor, bias: Tensor | None, group: int) -> Tensor:
    """x·Wᵀ + bias with W = (q − 8)·scale + zero stored two values a byte ([out, in/2]); zs = zero − 8·scale.

    scale and zs are float32 [out, in/group]; bias float32 [out] or None."""
    x, out, rows = _output(x, packed.shape[0])
    dtype = _DTYPES[x.dtype]
    code = _library().lmforge_q4_matmul(x.data_ptr(), dtype, packed.data_ptr(), scale.data_ptr(), zs.data_ptr(),
                                        _ptr(bias), out.data_ptr(), dtype, rows, packed.shape[0], x.shape[-1], group,
                                        torch.get_num_threads())
    if code:
        raise RuntimeError(f"lmforge_q4_matmul failed ({code}) for in_features={x.shape[-1]}, group={group}")
    return out
