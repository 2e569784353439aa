"""`lmforge runs` and `lmforge plot`, and what a script sees of a run: exit 130 when interrupted, a warmup that fits."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_cli as cli

import lmforge
from lmforge.errors import ConfigError
from lmforge.runs import plot, runs, summarize_run

TINY = dict(model="gpt2-tiny", block_size=32, batch_size=2, precision="32", log_every=1, progress=False)




def fake_run(path: Path, losses: list[float], val: dict[int, float]) -> Path:
    """A metrics.jsonl as the loop writes it: one line per step, a val_loss line at some steps."""
    path.mkdir(parents=True)
    lines = []
    for step, loss in enumerate(losses, start=1):
        lines.append({"step": step, "tokens": 64 * step, "loss": loss, "lr": 1e-3})
        if step in val:
            lines.append({"step": step, "tokens": 64 * step, "val_loss": val[step]})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 9, "lo')
    return path


def test_runs_lists_step_last_loss_val_loss_and_perplexity(tmp_path: Path, capsys) -> None:
    fake_run(tmp_path / "runs" / "a", [4.0, 3.5, 3.25], {2: 3.6, 3: 3.4})
    fake_run(tmp_path / "runs" / "nested" / "b", [5.0], {})
    (tmp_path / "runs" / "not-a-run").mkdir()
    a = summarize_run(tmp_path / "runs" / "a")  # the cut-off last line (a killed writer) is skipped
    assert (a["step"], a["loss"], a["val_loss"]) == (3, 3.25, 3.4) and a["ppl"] == pytest.approx(math.exp(3.4))
    code, out, err = cli(["runs", str(tmp_path / "runs")], capsys)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0].split() == ["run", "step", "loss", "val", "loss", "ppl"]
    assert lines[1].split() == [str(tmp_path / "runs" / "a"), "3", "3.2500", "3.4000", f"{math.exp(3.4):.2f}"]
    assert lines[2].split() == [str(tmp_path / "runs" / "nested" / "b"), "1", "5.0000", "-", "-"]
    assert len(lines) == 3
    assert runs(tmp_path / "runs" / "a").count("\n") == 1  # a run directory itself: just that run
    assert "no runs" in runs(tmp_path / "runs" / "not-a-run")


def test_plot_draws_each_runs_curves_to_a_png(tmp_path: Path, capsys) -> None:
    a = fake_run(tmp_path / "a", [4.0, 3.0, 2.5], {3: 2.7})
    b = fake_run(tmp_path / "b", [4.2, 3.9], {})
    png = tmp_path / "loss.png"
    code, _, err = cli(["plot", str(a), str(b), "--out", str(png), "--x", "tokens"], capsys)
    assert code == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    height, width = matplotlib.image.imread(png).shape[:2]
    assert (width, height) == (880, 495)
    code, _, err = cli(["plot", str(a), "--out", str(png)], capsys)  # the one overwrite rule
    assert code == 2 and "--overwrite" in err
    assert cli(["plot", str(a), "--out", str(png), "--overwrite"], capsys)[0] == 0
    code, _, err = cli(["plot", str(tmp_path / "missing"), "--out", str(tmp_path / "x.png")], capsys)
    assert code == 2 and "missing" in err and "metrics.jsonl" in err


def test_plot_without_matplotlib_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = fake_run(tmp_path / "a", [4.0], {})
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib → ImportError
    with pytest.raises(ConfigError, match="pip install matplotlib"):
        plot([a], tmp_path / "loss.png")
    assert not (tmp_path / "loss.png").exists()


def test_a_warmup_longer_than_the_run_is_shortened_with_a_notice(tiny_packed: Path, tmp_path: Path, capsys) -> None:
    """warmup 50 in a 5-step run would never reach --lr: it becomes 0 (a tenth of 5), so step 1 runs at the peak."""
    run = lmforge.pretrain(tiny_packed, out=tmp_path / "run", max_steps=5, warmup_steps=50, lr=1e-3,
                           schedule="constant", **TINY)
    err = capsys.readouterr().err
    assert "warmup_steps 50 is not shorter than this run's 5 steps" in err and "warming up over 0 steps" in err
    lrs = [r["lr"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "lr" in r]
    assert lrs == [pytest.approx(1e-3)] * 5
    kept = lmforge.pretrain(tiny_packed, out=tmp_path / "kept", max_steps=5, warmup_steps=4, lr=1e-3,
                            schedule="constant", **TINY)
    assert "warming up over" not in capsys.readouterr().err
    lrs = [r["lr"] for r in map(json.loads, (kept / "metrics.jsonl").read_text().splitlines()) if "lr" in r]
    assert lrs[0] == pytest.approx(1e-3 / 4)


def test_an_interrupted_run_saves_then_exits_130(tiny_packed: Path, tmp_path: Path) -> None:
    """Ctrl-C (SIGINT) finishes the step, saves a resumable checkpoint and exits 130, as a shell reports SIGINT."""
    out = tmp_path / "run"
    args = [sys.executable, "-c", "import sys; from lmforge.cli import main; sys.exit(main())", "pretrain",
            "--data", str(tiny_packed), "--out", str(out), "--max-steps", "100000", "--model", "gpt2-tiny",
            "--block-size", "32", "--batch-size", "2", "--precision", "32", "--log-every", "1",
            "--progress", "false", "--save-every", "100000"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert (out / "train_state.pt").exists() and "continue with --resume" in stdout + stderr
    assert "Traceback" not in stderr
