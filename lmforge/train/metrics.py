"""Where a run's step metrics go: metrics.jsonl in the run directory, and TensorBoard when asked.

metrics.jsonl is part of the run directory (DESIGN.md), so it is always written; `--logger tensorboard`
adds event files in out/tensorboard/ (`tensorboard --logdir runs/` shows every run side by side).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from lmforge.errors import ConfigError
from lmforge.io import atomic_write_text

Logger = Literal["jsonl", "tensorboard", "both"]


class MetricsLog:
    """`log({"step": 10, "loss": 2.3, ...})` appends a line and, with TensorBoard, one scalar per number.

    Resuming from step s drops whatever was logged after s (the run is about to log it again), so a curve
    never has doubled steps.
    """

    def __init__(self, out: Path, logger: Logger = "jsonl", *, resume_step: int | None = None) -> None:
        path = Path(out) / "metrics.jsonl"
        if resume_step is not None and path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line and json.loads(line).get("step", 0) <= resume_step]
            atomic_write_text(path, "".join(line + "\n" for line in kept))
        self.file = open(path, "a")  # noqa: SIM115 (closed by close())
        self.writer = None
        if logger in ("tensorboard", "both"):
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("--logger tensorboard needs the tensorboard package: pip install tensorboard"
                                  ) from None
            # purge_step: events past the resumed step are dropped, as metrics.jsonl's lines are
            self.writer = SummaryWriter(str(Path(out) / "tensorboard"), purge_step=resume_step)

    def log(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record["step"])
            self.writer.flush()

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()
