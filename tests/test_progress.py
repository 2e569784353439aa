"""The progress line's ETA for a resumed job counts only the time and work left, not the whole job's."""

from __future__ import annotations

import io

import pytest

from lmforge import progress
from lmforge.progress import Progress


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    now = [100.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: now[0])
    return now


def test_eta_of_a_resumed_count_uses_the_rate_since_the_resume(clock: list[float]) -> None:
    out = io.StringIO()
    bar = Progress(1000, "train", unit="steps", stream=out, initial=600)
    clock[0] += 40.0
    bar.update(700, force=True)  # 100 steps in 40 s: 300 left take 120 s, not 40 × 300 / 700
    assert out.getvalue().rstrip().endswith("eta 02:00")


def test_eta_of_a_time_limit_counts_down_from_the_given_remainder(clock: list[float]) -> None:
    out = io.StringIO()
    bar = Progress(None, "train", stream=out, time_limit=600.0)
    clock[0] += 60.0
    bar.update(5, force=True)
    assert out.getvalue().rstrip().endswith("elapsed 01:00 | eta 09:00")
