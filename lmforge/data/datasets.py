"""Document readers: turn a file, a folder or a list of them into a stream of text documents.

Documents are streamed one at a time so a corpus larger than memory can be tokenized or packed.
A `.jsonl` file holds one document per line (in a named field); any other text file is one document.
"""

from __future__ import annotations

import codecs
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from lmforge.errors import DataError

_SNIFF_BYTES = 8192
_SKIP_DIRS = {"__pycache__"}


def _is_binary(path: Path) -> bool:
    """Guess from the first 8 KiB: a NUL byte or invalid UTF-8 means the file is not text."""
    with open(path, "rb") as f:
        head = f.read(_SNIFF_BYTES)
    if b"\x00" in head:
        return True
    try:
        # final=False: the 8 KiB cut may fall inside a multi-byte character, which is not an error.
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return True
    return False


def _skipped(name: str) -> bool:
    return name.startswith(".") or name in _SKIP_DIRS


def walk_files(root: Path, glob: str | None = None) -> list[Path]:
    """Files under `root` in sorted order; hidden folders are pruned, not walked (think `.git`, `.venv`)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not _skipped(d)]
        for name in filenames:
            f = Path(dirpath, name)
            if not _skipped(name) and f.is_file() and (glob is None or f.relative_to(root).match(glob)):
                found.append(f)
    return sorted(found)


def shard_files(root: Path) -> list[Path] | None:
    """The shards listed in `root`/manifest.json when `root` was written by `data clean` / `data dedup`."""
    manifest = root / "manifest.json"
    if not manifest.is_file():
        return None
    try:
        meta = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or not str(meta.get("format", "")).startswith("lmforge-shards/"):
        return None
    return [root / s["file"] for s in meta["shards"]]


def list_files(data: str | Path | Sequence[str | Path], glob: str | None = None) -> list[Path]:
    """Resolve `data` (a file, a folder searched recursively, or a list of either) to text files.

    Folders are walked in sorted order so every run sees the same files in the same order;
    hidden entries, `__pycache__` and binary files are skipped. A file named explicitly must be text.
    A folder written by `data clean` / `data dedup` stands for the (maybe compressed) shards it lists.
    """
    paths = [data] if isinstance(data, (str, Path)) else list(data)
    if not paths:
        raise DataError("no data paths given")
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_file():
            if _is_binary(p):
                raise DataError(f"{p}: not a UTF-8 text file (binary content in the first 8 KiB)")
            files.append(p)
        elif p.is_dir():
            shards = shard_files(p) if glob is None else None
            found = shards if shards is not None else [f for f in walk_files(p, glob) if not _is_binary(f)]
            if not found:
                pattern = f" matching {glob!r}" if glob else ""
                raise DataError(f"{p}: no readable text files{pattern} in this folder")
            files.extend(found)
        else:
            raise DataError(f"{p}: no such file or directory")
    return files


def iter_jsonl_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line of a JSONL file (also .jsonl.gz / .jsonl.zst);
    bad UTF-8, bad JSON or a non-object line is a DataError naming file:line."""
    from lmforge.data.readers import open_binary  # .jsonl.gz / .jsonl.zst shards from `data clean`

    with open_binary(path) as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{line_no}: invalid UTF-8 at byte {e.start} of the line") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line_no}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{line_no}: expected a JSON object, got {type(row).__name__}")
            yield line_no, row


def _iter_jsonl(path: Path, field: str) -> Iterator[str]:
    for line_no, row in iter_jsonl_rows(path):
        if field not in row:
            raise DataError(f"{path}:{line_no}: field {field!r} missing (found keys: {sorted(row)})")
        text = row[field]
        if not isinstance(text, str):
            raise DataError(f"{path}:{line_no}: field {field!r} must be a string, got {type(text).__name__}")
        if text:
            yield text


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line_no = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line_no}: invalid UTF-8 at byte offset {e.start}") from None


def iter_file_documents(path: Path, field: str = "text") -> Iterator[str]:
    """Documents of one file: each non-empty line's `field` for `.jsonl`, else the whole file."""
    path = Path(path)
    if path.suffix.lower() == ".jsonl" or path.name.lower().endswith((".jsonl.zst", ".jsonl.gz")):
        yield from _iter_jsonl(path, field)
    else:
        text = _read_text(path)
        if text:
            yield text


def iter_documents(
    data: str | Path | Sequence[str | Path], *, field: str = "text", glob: str | None = None
) -> Iterator[str]:
    """Stream every non-empty document under `data`, file by file in `list_files` order."""
    for path in list_files(data, glob):
        yield from iter_file_documents(path, field)
