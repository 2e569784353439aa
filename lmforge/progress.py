"""One progress line for every long job: counts, rates and ETA on stderr.

On a terminal the line redraws in place; in a log file (CI, nohup) it prints a full line at most
every `interval` seconds so logs stay readable.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """`Progress(total, "train").update(step, loss=2.1, lr=3e-4)`; ETA from the mean rate since start."""

    def __init__(self, total: float | None, desc: str, *, unit: str = "it", interval: float | None = None,
                 stream: TextIO | None = None, enabled: bool = True, time_limit: float | None = None,
                 initial: float = 0.0) -> None:
        """`time_limit` (seconds from now) gives an ETA to jobs bounded by time rather than by a count; `initial`
        is the count a resumed job starts from, so its rate counts only the work done since."""
        self.total, self.desc, self.unit, self.enabled = total, desc, unit, enabled
        self.initial = initial
        self.time_limit = time_limit
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.interval = interval if interval is not None else (0.2 if self.tty else 10.0)
        self.start = time.perf_counter()
        self.last_print = -float("inf")
        self.done = initial
        self.fields: dict[str, Any] = {}

    def update(self, done: float, *, force: bool = False, **fields: Any) -> None:
        self.done = done
        self.fields.update(fields)
        now = time.perf_counter()
        if self.enabled and (force or now - self.last_print >= self.interval):
            self.last_print = now
            self._print(now)

    def elapsed(self) -> float:
        return max(time.perf_counter() - self.start, 1e-9)

    def _print(self, now: float) -> None:
        elapsed = now - self.start
        parts = [self.desc]
        if self.total:
            parts.append(f"{self.done:g}/{self.total:g} {self.unit} ({100 * self.done / self.total:3.0f}%)")
        else:
            parts.append(f"{self.done:g} {self.unit}")
        parts += [f"{k} {_fmt(v)}" for k, v in self.fields.items()]
        parts.append(f"elapsed {format_duration(elapsed)}")
        eta = [self.time_limit - elapsed] if self.time_limit else []
        if self.total and self.done > self.initial:
            eta.append(elapsed * (self.total - self.done) / (self.done - self.initial))
        if eta:
            parts.append(f"eta {format_duration(min(eta))}")
        line = " | ".join(parts)
        self.stream.write(f"\r\033[K{line}" if self.tty else f"{line}\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._print(time.perf_counter())
            if self.tty:
                self.stream.write("\n")
            self.stream.flush()


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e-2 or abs(value) >= 1e5 else f"{value:.4g}"
    return str(value)
