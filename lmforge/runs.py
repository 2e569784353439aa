"""`lmforge runs [DIR]` and `lmforge plot RUN [RUN ...]`: what a folder of runs holds, and their loss curves.

Both read only each run's metrics.jsonl (the loop's log: {"step", "loss", ...} lines and {"step", "val_loss"}
lines; a resumed run has already dropped the lines it logged past its checkpoint), so they work on a run that
is still training and on one copied from another machine without its weights.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

from lmforge.errors import ConfigError, DataError
from lmforge.io import check_output

METRICS = "metrics.jsonl"


def find_runs(root: Path) -> list[Path]:
    """`root` itself when it is a run, else every run directory below it (sorted by path)."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"{root}: no such directory")
    if (root / METRICS).is_file():
        return [root]
    return sorted(p.parent for p in root.rglob(METRICS))


def read_metrics(run: Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl; a line cut short by a killed writer is skipped."""
    path = Path(run) / METRICS
    if not path.is_file():
        raise DataError(f"{run}: no {METRICS}; not a training run directory")
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def summarize_run(run: Path) -> dict[str, Any]:
    """{"run", "step", "tokens", "loss", "val_loss", "ppl"} of one run: its last logged values (None where absent);
    ppl is exp(val_loss), the validation perplexity in the tokenizer's tokens."""
    records = read_metrics(run)
    train = [r for r in records if isinstance(r.get("loss"), (int, float))]
    val = [r for r in records if isinstance(r.get("val_loss"), (int, float))]
    steps = [r["step"] for r in records if isinstance(r.get("step"), int)]
    val_loss = val[-1]["val_loss"] if val else None
    return {"run": str(run), "step": max(steps) if steps else None,
            "tokens": train[-1].get("tokens") if train else None,
            "loss": train[-1]["loss"] if train else None, "val_loss": val_loss,
            "ppl": math.exp(val_loss) if val_loss is not None and val_loss < 700 else None}


def _cell(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def runs(root: Path = Path("runs")) -> str:
    """List training runs: each one's step, last training loss, validation loss and perplexity.

    Args:
        root: A run directory, or a folder searched for runs (any directory holding a metrics.jsonl).

    Returns:
        A table, one run per row.
    """
    found = find_runs(root)
    if not found:
        return f"no runs under {root} (a run is a directory with a {METRICS})"
    rows = [summarize_run(run) for run in found]
    header = ["run", "step", "loss", "val loss", "ppl"]
    cells = [[r["run"], _cell(r["step"]), _cell(r["loss"]), _cell(r["val_loss"]), _cell(r["ppl"], 2)] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))]
    lines += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
              for row in cells]
    return "\n".join(lines)


def plot(runs: list[Path], out: Path = Path("loss.png"), *, x: Literal["step", "tokens"] = "step",
         log_y: bool = False, overwrite: bool = False) -> Path:
    """Draw the loss curves of one or more runs into a PNG: training loss as a line, validation loss as dots
    on a dashed line of the same colour.

    Args:
        runs: Run directories (each with a metrics.jsonl).
        out: The PNG to write; refused if it exists, unless `overwrite`.
        x: "step" or "tokens" on the horizontal axis (tokens compares runs of different batch sizes fairly).
        log_y: A logarithmic loss axis.
        overwrite: Replace `out`.

    Returns:
        The PNG's path.
    """
    if x not in ("step", "tokens"):
        raise ConfigError(f"--x accepts one of: step, tokens; got {x!r}")
    paths = [Path(r) for r in ([runs] if isinstance(runs, (str, Path)) else runs)]
    if not paths:
        raise ConfigError("give at least one run directory: lmforge plot runs/a [runs/b ...] --out loss.png")
    out = Path(out)
    check_output(out, overwrite)
    curves = {str(p): read_metrics(p) for p in paths}  # every run read before anything is drawn
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("lmforge plot needs matplotlib: pip install matplotlib (the metrics are in each run's "
                          f"{METRICS} meanwhile)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    drawn = 0
    for i, (name, records) in enumerate(curves.items()):
        colour = f"C{i % 10}"
        train = [(r[x], r["loss"]) for r in records if x in r and isinstance(r.get("loss"), (int, float))]
        val = [(r[x], r["val_loss"]) for r in records if x in r and isinstance(r.get("val_loss"), (int, float))]
        if train:
            ax.plot(*zip(*train), color=colour, label=f"{name} train")
        if val:
            ax.plot(*zip(*val), "o--", color=colour, label=f"{name} val")
        drawn += bool(train or val)
    if not drawn:
        plt.close(fig)
        raise DataError(f"no loss values in the {METRICS} of {', '.join(curves)}")
    ax.set_xlabel(x)
    ax.set_ylabel("cross-entropy (nats/token)")
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
