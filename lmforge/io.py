"""Atomic file writes: a process killed at any moment leaves either the old file or the new one.

Every file lmforge writes into a checkpoint or dataset directory goes through here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lmforge.errors import ConfigError


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync and rename it over `path`.

    rename(2) within one directory is atomic on POSIX, so readers never see a half-written file.
    On an exception the temporary file is removed and `path` is left untouched.
    """
    path = Path(path)
    tmp = temp_path_for(path)
    try:
        yield tmp
        commit(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def temp_path_for(path: Path) -> Path:
    """A hidden name beside `path` (same filesystem, so the final rename is atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def commit(tmp: Path, path: Path) -> None:
    """Flush `tmp` to disk, then rename it over `path`: the data is durable before it becomes visible."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def remove_stale_temps(directory: str | Path) -> None:
    """Delete temporary files left by a process that was killed mid-write."""
    for tmp in Path(directory).glob(".*.tmp-*"):
        tmp.unlink(missing_ok=True)


def check_output(out: str | Path, overwrite: bool = False, *, option: str = "--out") -> None:
    """The one overwrite rule of every verb: a non-empty file or folder at `out` is refused unless `overwrite`.

    A run, a report or a labelled file is work someone may not have copied; replacing it is the user's call.
    """
    out = Path(out)
    if out.is_dir():
        full, what = any(out.iterdir()), "folder is not empty"
    else:
        full, what = out.is_file() and out.stat().st_size > 0, "file already exists"
    if full and not overwrite:
        raise ConfigError(f"{option} {out}: {what}; choose another {option} or pass --overwrite to replace it")
