"""Launching training under torchrun for the multi-process tests (gloo on CPU, one thread per process).

Not a conftest: `from conftest import ...` in the tests means tests/conftest.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def torchrun(script: str, tmp_path: Path, nproc: int, *launcher: str, wait: bool = True,
             name: str = "script") -> subprocess.Popen | subprocess.CompletedProcess:
    """Run Python `script` as `python -m torch.distributed.run --nproc-per-node N` (standalone unless the
    `launcher` options say otherwise); fails the test with the processes' stderr if they fail."""
    path = tmp_path / f"{name}.py"
    path.write_text(script)
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            *(launcher or ("--standalone",)), str(path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"torchrun --nproc-per-node {nproc} failed:\n{proc.stderr[-4000:]}")
    return proc


def train_call(verb: str, *args: object, **kwargs: object) -> str:
    """Python source calling `lmforge.<verb>(*args, **kwargs)`, for a script run by each process."""
    listed = ", ".join([*map(repr, args), *(f"{k}={v!r}" for k, v in kwargs.items())])
    return f"import lmforge\nfrom pathlib import PosixPath\nlmforge.{verb}({listed})\n"


# fp32, a global batch of 4 windows; AdamW with clipping, so grad_norm (logged each step) is the whole-batch
# gradient's norm: a gradient summed over ranks instead of averaged (pytorch#162338) would double it.
RUN = dict(model="gpt2-tiny", block_size=32, warmup_steps=2, precision="32", log_every=1, eval_every=100,
           progress=False, lr=3e-3, grad_clip=1.0, schedule="constant", seed=3)


def curve(run: Path) -> dict[int, tuple[float, float]]:
    """{step: (loss, gradient norm)} from a run's metrics.jsonl."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in rows if "loss" in r}


def assert_same_steps(run: Path, reference: Path, tol: float = 2e-5, steps: range | None = None) -> None:
    """Equal losses and gradient norms at every step of `reference` (or `steps`): fp32, only the order of
    summation differs between process counts."""
    ours, theirs = curve(run), curve(reference)
    steps = steps or range(1, len(theirs) + 1)
    assert set(steps) <= ours.keys() and set(steps) <= theirs.keys(), (sorted(ours), sorted(theirs))
    for step in steps:
        loss, norm = theirs[step]
        assert ours[step][0] == pytest.approx(loss, abs=tol), f"loss at step {step}"
        assert ours[step][1] == pytest.approx(norm, rel=tol), f"gradient norm at step {step}"
