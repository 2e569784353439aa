"""A training run SIGKILLed at random moments, once in the middle of writing a checkpoint, and
resumed each time, ends exactly where an uninterrupted run ends: same losses, same weights.

The kills come from outside, as an OOM killer or a pre-empted node would deliver them: this test watches
the run's metrics.jsonl and kills the process a random few milliseconds after a randomly chosen step. For
a kill during a save, the child's `save_file` writes half a weights file, says so in a marker file and
lingers; the test kills it there. The seed is printed on failure (set KILL_SEED to replay it).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import lmforge
from lmforge.checkpoint import load_train_state

STEPS, SAVE_EVERY = 24, 3
RUN = dict(model="gpt2-tiny", block_size=32, batch_size=4, warmup_steps=2, precision="32", log_every=1,
           eval_every=1000, save_every=SAVE_EVERY, lr=1e-3, progress=False)

CHILD = textwrap.dedent("""
    import os, sys, time
    import torch
    torch.set_num_threads(int(os.environ["THREADS"]))  # the reference run's threads: the same reductions
    marker = os.environ.get("SAVING_MARKER")
    if marker:  # the first save of this process: half a file on disk, then linger until killed
        import lmforge.checkpoint as ck
        real = ck.save_file
        def slow_save(tensors, path, metadata=None):
            with open(path, "wb") as f:
                f.write(b"half a weights file")
            open(marker, "w").close()
            time.sleep(30)
            real(tensors, path, metadata=metadata)
        ck.save_file = slow_save
    import json, lmforge
    args = json.loads(sys.argv[1])
    lmforge.pretrain(**args)
""")


def logged_step(run: Path) -> int:
    """The last step in metrics.jsonl (a line being written may be incomplete: skipped)."""
    path, step = run / "metrics.jsonl", 0
    if path.exists():
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                step = max(step, json.loads(line).get("step", 0))
    return step


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def start(args: dict, marker: Path | None = None) -> subprocess.Popen:
    env = {**os.environ, "THREADS": str(torch.get_num_threads())}
    if marker is not None:
        env["SAVING_MARKER"] = str(marker)
    return subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(args, default=str)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def kill_after_step(proc: subprocess.Popen, run: Path, step: int, delay: float, note: str) -> None:
    """SIGKILL `proc` `delay` seconds after metrics.jsonl shows `step` (mid-step, mid-save or mid-log)."""
    deadline = time.monotonic() + 180  # a loaded machine takes long to start
    while logged_step(run) < step:
        assert proc.poll() is None, f"{note}: exited {proc.returncode} before step {step}: {proc.stderr.read()}"
        assert time.monotonic() < deadline, f"{note}: step {step} never came"
        time.sleep(0.002)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL, f"{note}: finished before the kill"


def kill_during_save(proc: subprocess.Popen, marker: Path, note: str) -> None:
    deadline = time.monotonic() + 180  # a loaded machine takes long to start
    while not marker.exists():
        assert proc.poll() is None, f"{note}: exited {proc.returncode} before a save: {proc.stderr.read()}"
        assert time.monotonic() < deadline, f"{note}: no save began"
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL
    marker.unlink()


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_matches_an_uninterrupted_run(tiny_packed: Path,
                                                                           tmp_path: Path) -> None:
    seed = int(os.environ.get("KILL_SEED", time.time_ns() % 1_000_000))
    rng = random.Random(seed)
    note = f"KILL_SEED={seed}"
    full = lmforge.pretrain(tiny_packed, out=tmp_path / "full", max_steps=STEPS, **RUN)

    run, marker = tmp_path / "killed", tmp_path / "saving"
    resume = {"resume": str(run), "progress": False}
    # 1. the fresh run, killed at a random moment after its first checkpoint
    target = rng.randint(SAVE_EVERY + 1, 8)  # a checkpoint exists by then
    kill_after_step(start({"data": str(tiny_packed), "out": str(run), "max_steps": STEPS, **RUN}), run, target,
                    rng.uniform(0, 0.03), f"{note} first kill after step {target}")
    kills = [f"after step {target}"]
    # 2. resumed, killed while writing its first checkpoint (half the weights file on disk)
    kill_during_save(start(resume, marker), marker, f"{note} kill during a save")
    kills.append(f"during the save of step {load_train_state(run)['step'] + SAVE_EVERY}")
    # 3. resumed, killed at a random moment further on (past what the killed runs logged: metrics.jsonl
    # still shows their steps until the resumed run drops them)
    target = rng.randint(logged_step(run) + 1, STEPS - 2)
    kill_after_step(start(resume), run, target, rng.uniform(0, 0.03), f"{note} kill after step {target}")
    kills.append(f"after step {target}")
    # 4. resumed to the end
    last = start(resume)
    assert last.wait(180) == 0, f"{note}: {last.stderr.read()[-3000:]}"

    assert load_train_state(run)["step"] == STEPS
    assert losses(run) == losses(full), f"{note}; killed {kills}"
    a, b = lmforge.load(full).model.state_dict(), lmforge.load(run).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), f"{note}; killed {kills}"
    assert not [p.name for p in run.iterdir() if ".tmp-" in p.name]


def test_a_kill_between_the_two_renames_of_a_save_is_finished_on_resume(tmp_path):
    """The window the random kills above can hit only rarely, made exact: the weights of step 6 renamed into
    place, the process killed before train_state.pt of step 6 was (its complete temporary file left behind,
    as a SIGKILL runs no cleanup). Resuming finishes that save instead of refusing a step-3 state."""
    from lmforge.checkpoint import TRAIN_STATE, save_checkpoint
    from lmforge.config import preset
    from lmforge.model.gpt import GPT

    model = GPT(preset("gpt2-tiny", vocab_size=64))
    save_checkpoint(tmp_path, model, model.config, train_state={"marker": "three"}, step=3)
    save_checkpoint(tmp_path / "next", model, model.config, train_state={"marker": "six"}, step=6)
    (tmp_path / "next" / "model.safetensors").replace(tmp_path / "model.safetensors")
    (tmp_path / "next" / TRAIN_STATE).replace(tmp_path / f".{TRAIN_STATE}.tmp-12345")
    (tmp_path / f".{TRAIN_STATE}.tmp-999").write_bytes(b"cut short")  # another kill, mid-write: skipped
    state = load_train_state(tmp_path)
    assert (state["step"], state["marker"]) == (6, "six")
    assert torch.load(tmp_path / TRAIN_STATE, weights_only=True)["step"] == 6
