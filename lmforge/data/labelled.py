"""Labelled examples for `finetune classify|regress` and `predict`: (line, text, target) per row.

Rows come from `lmforge.data.readers.read_rows`, so a JSONL, CSV/TSV or Parquet file (optionally .gz/.zst)
works, and every bad row is named by file:line.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from lmforge.data.readers import read_rows
from lmforge.errors import DataError


def read_labelled(path: Path, text_field: str, target_field: str | None, task: str) -> list[tuple[int, str, Any]]:
    """(line, text, target) per row; the target is a label string (classify) or a float (regress).

    With `target_field=None` the targets are None (texts to predict on).
    """
    rows = []
    for line_no, row in read_rows(path):
        where = f"{path}:{line_no}"
        text = row.get(text_field)
        if not isinstance(text, str) or not text.strip():
            found = "missing" if text_field not in row else "empty or not a string"
            raise DataError(f"{where}: field {text_field!r} is {found} (found keys: {sorted(row)})")
        target: Any = None
        if target_field is not None:
            if target_field not in row or row[target_field] in (None, ""):
                raise DataError(f"{where}: field {target_field!r} missing (found keys: {sorted(row)})")
            value = row[target_field]
            if task == "classify":
                if isinstance(value, (dict, list, float)):
                    raise DataError(f"{where}: label {value!r} must be a string or an integer")
                target = str(value)
            else:
                try:
                    target = float(value)
                except (TypeError, ValueError):
                    raise DataError(f"{where}: field {target_field!r} is {value!r}, not a number") from None
                if not math.isfinite(target):
                    raise DataError(f"{where}: field {target_field!r} is {value!r}, not a finite number")
        rows.append((line_no, text, target))
    if not rows:
        raise DataError(f"{path}: no examples")
    return rows
