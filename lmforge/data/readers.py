"""Streaming corpus readers and sharded JSONL writers for the preprocessing stage.

A reader yields one record per input document: a `dict` with at least `id` and `text`, or a `Skip`
saying why a document could not be read (bad JSON, missing field, undecodable bytes, unreadable file).
Nothing is dropped silently, so `clean` can prove that every input document is kept, removed by a rule,
or skipped with a reason. Files are read line by line (or batch by batch for Parquet), so memory stays
flat however large the corpus; a plain-text file read as one document is the one exception.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

from lmforge.data.datasets import shard_files, walk_files
from lmforge.errors import DataError
from lmforge.io import commit, temp_path_for

TextUnit = Literal["file", "paragraph"]
OnError = Literal["raise", "skip"]
BadBytes = Literal["replace", "skip", "raise"]

_COMPRESSED = {".gz", ".zst"}
_JSONL = {".jsonl", ".ndjson", ".json"}


@dataclass(frozen=True)
class Skip:
    """An input document that could not be read: `id` is `file:line` (or `file`), `reason` a short key."""

    id: str
    reason: str
    detail: str

    def as_row(self) -> dict[str, str]:
        return {"id": self.id, "reason": self.reason, "detail": self.detail}


Record = dict[str, Any] | Skip


def input_files(input: str | Path | Iterable[str | Path], glob: str | None = None) -> list[tuple[Path, str]]:
    """(path, display name) for every file under `input`, sorted so every run sees one order.

    Folders are searched recursively (hidden entries pruned) and filtered by `glob` on the relative path,
    e.g. `"**/*.jsonl.zst"`; a folder written by `clean`/`dedup` stands for the shards its manifest lists.
    The display name, relative to the folder given, names documents in ids.
    """
    roots = [input] if isinstance(input, (str, Path)) else list(input)
    if not roots:
        raise DataError("no input paths given")
    found: list[tuple[Path, str]] = []
    for root in map(Path, roots):
        if root.is_file():
            found.append((root, root.name))
        elif root.is_dir():
            files = shard_files(root) if glob is None else None
            files = files if files is not None else walk_files(root, glob)
            if not files:
                raise DataError(f"{root}: no files{f' matching {glob!r}' if glob else ''} in this folder")
            found += [(f, str(f.relative_to(root))) for f in files]
        else:
            raise DataError(f"{root}: no such file or directory")
    return found


def file_format(path: Path) -> str:
    """'jsonl', 'csv', 'tsv', 'parquet' or 'text', from the suffix under any .gz/.zst."""
    suffixes = [s.lower() for s in path.suffixes]
    while suffixes and suffixes[-1] in _COMPRESSED:
        suffixes.pop()
    ext = suffixes[-1] if suffixes else ""
    if ext in _JSONL:
        return "jsonl"
    if ext in {".csv", ".tsv", ".parquet"}:
        return ext[1:]
    return "text"


def open_binary(path: Path) -> IO[bytes]:
    """A byte stream of `path`, decompressing `.gz` and `.zst` on the fly (never whole in memory)."""
    suffix = path.suffix.lower()
    if suffix == ".gz":
        return gzip.open(path, "rb")
    if suffix == ".zst":
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


class _Decoder:
    """UTF-8 decoding with the configured policy; bad bytes are reported with file, line and byte offset."""

    def __init__(self, name: str, bad_bytes: BadBytes, notes: list[Skip] | None) -> None:
        self.name, self.bad_bytes = name, bad_bytes
        self.notes = notes  # lines whose undecodable bytes became U+FFFD: kept, but logged

    def decode(self, raw: bytes, line_no: int, offset: int) -> str | Skip:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            where = f"{self.name}:{line_no}"
            detail = f"invalid UTF-8 at byte offset {offset + e.start}"
            if self.bad_bytes == "raise":
                raise DataError(f"{where}: {detail} (bad_bytes='raise'; 'replace' or 'skip' to go on)") from None
            if self.bad_bytes == "skip":
                return Skip(where, "undecodable", detail)
            if self.notes is not None:
                self.notes.append(Skip(where, "replaced-bytes", detail))
            return raw.decode("utf-8", errors="replace")


def _fail(on_error: OnError, skip: Skip) -> Skip:
    if on_error == "raise":
        raise DataError(f"{skip.id}: {skip.detail} (pass --on-error skip to log such lines and go on)")
    return skip


def _lines(stream: IO[bytes]) -> Iterator[tuple[int, int, bytes]]:
    """(line number, byte offset of the line, raw line) over a byte stream."""
    offset = 0
    for line_no, raw in enumerate(stream, start=1):
        yield line_no, offset, raw
        offset += len(raw)


def _read_jsonl(stream: IO[bytes], name: str, field: str, on_error: OnError, dec: _Decoder) -> Iterator[Record]:
    for line_no, offset, raw in _lines(stream):
        if not raw.strip():
            continue
        line = dec.decode(raw, line_no, offset)
        if isinstance(line, Skip):
            yield line
            continue
        where = f"{name}:{line_no}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            yield _fail(on_error, Skip(where, "invalid-json", f"invalid JSON ({e.msg} at column {e.colno})"))
            continue
        if not isinstance(row, dict):
            yield _fail(on_error, Skip(where, "not-an-object", f"expected a JSON object, got {type(row).__name__}"))
        elif field not in row:
            yield _fail(on_error, Skip(where, "missing-field", f"field {field!r} missing (found keys: {sorted(row)})"))
        elif not isinstance(row[field], str):
            yield _fail(on_error, Skip(where, "not-a-string",
                                       f"field {field!r} must be a string, got {type(row[field]).__name__}"))
        else:
            text = row.pop(field)
            yield {"id": where, **row, "text": text}


def _read_csv(stream: IO[bytes], name: str, field: str, on_error: OnError, dec: _Decoder,
              delimiter: str) -> Iterator[Record]:
    skips: list[Skip] = []

    def decoded() -> Iterator[str]:
        for line_no, offset, raw in _lines(stream):
            line = dec.decode(raw, line_no, offset)
            if isinstance(line, Skip):
                skips.append(line)
                continue
            yield line

    csv.field_size_limit(sys.maxsize)
    reader = csv.reader(decoded(), delimiter=delimiter)
    header = next(reader, None)
    yield from skips
    skips.clear()
    if header is None:
        return
    if field not in header:
        raise DataError(f"{name}:1: column {field!r} missing (found columns: {header})")
    col = header.index(field)
    while True:
        try:
            values = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            yield _fail(on_error, Skip(f"{name}:{reader.line_num}", "invalid-csv", str(e)))
            continue
        yield from skips
        skips.clear()
        where = f"{name}:{reader.line_num}"
        if not values:
            continue
        if len(values) != len(header):
            yield _fail(on_error, Skip(where, "invalid-csv", f"{len(values)} fields, header has {len(header)}"))
            continue
        row = dict(zip(header, values))
        yield {"id": where, **{k: v for k, v in row.items() if k != field}, "text": values[col]}
    yield from skips


def _read_parquet(path: Path, name: str, field: str) -> Iterator[Record]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if field not in pf.schema_arrow.names:
        raise DataError(f"{name}: column {field!r} missing (found columns: {pf.schema_arrow.names})")
    row_no = 0
    for batch in pf.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            row_no += 1
            text = row.pop(field)
            if not isinstance(text, str):
                yield Skip(f"{name}#{row_no}", "not-a-string", f"column {field!r} is {type(text).__name__}")
            else:
                yield {"id": f"{name}#{row_no}", **row, "text": text}


def _read_text(stream: IO[bytes], name: str, unit: TextUnit, dec: _Decoder) -> Iterator[Record]:
    if unit == "file":
        raw = stream.read()
        text = dec.decode(raw, raw.count(b"\n", 0, _first_bad(raw)) + 1, 0)
        yield text if isinstance(text, Skip) else {"id": name, "text": text}
        return
    block: list[str] = []
    start = 0
    for line_no, offset, raw in _lines(stream):
        line = dec.decode(raw, line_no, offset)
        if isinstance(line, Skip):
            yield Skip(f"{name}:{start or line_no}", line.reason, line.detail)
            block, start = [], 0
            continue
        if line.strip():
            block.append(line)
            start = start or line_no
        elif block:
            yield {"id": f"{name}:{start}", "text": "".join(block)}
            block, start = [], 0
    if block:
        yield {"id": f"{name}:{start}", "text": "".join(block)}


def _first_bad(raw: bytes) -> int:
    try:
        raw.decode("utf-8")
        return 0
    except UnicodeDecodeError as e:
        return e.start


def read_file(path: Path, name: str | None = None, *, text_field: str = "text", text_unit: TextUnit = "file",
              on_error: OnError = "raise", bad_bytes: BadBytes = "replace",
              notes: list[Skip] | None = None) -> Iterator[Record]:
    """Stream the records of one file (see the module docstring); empty documents become `Skip("empty")`.

    With `bad_bytes="replace"`, each line whose bytes were replaced is appended to `notes` (if given).
    """
    name = name or path.name
    fmt = file_format(path)
    dec = _Decoder(name, bad_bytes, notes)
    try:
        if fmt == "parquet":
            records = _read_parquet(path, name, text_field)
            yield from _non_empty(records)
            return
        with open_binary(path) as stream:
            if fmt == "jsonl":
                records = _read_jsonl(stream, name, text_field, on_error, dec)
            elif fmt in {"csv", "tsv"}:
                records = _read_csv(stream, name, text_field, on_error, dec, "," if fmt == "csv" else "\t")
            else:
                records = _read_text(stream, name, text_unit, dec)
            yield from _non_empty(records)
    except (OSError, EOFError) as e:
        # Unreadable, truncated or corrupt compressed files: the rest of this file cannot be trusted.
        yield _fail(on_error, Skip(name, "unreadable", f"cannot read: {e}"))
    except Exception as e:  # pyarrow and zstandard raise their own types for corrupt files
        if type(e).__module__.split(".")[0] not in {"pyarrow", "zstandard", "zstd"}:
            raise
        yield _fail(on_error, Skip(name, "unreadable", f"cannot read: {e}"))


def _non_empty(records: Iterable[Record]) -> Iterator[Record]:
    for r in records:
        if not isinstance(r, Skip) and not r["text"].strip():
            yield Skip(r["id"], "empty", "document is empty or whitespace only")
        else:
            yield r


def read_documents(input: str | Path | Iterable[str | Path], *, glob: str | None = None, text_field: str = "text",
                   text_unit: TextUnit = "file", on_error: OnError = "raise",
                   bad_bytes: BadBytes = "replace") -> Iterator[Record]:
    """Every record under `input` (files, folders, compressed or not), file by file in sorted order."""
    for path, name in input_files(input, glob):
        yield from read_file(path, name, text_field=text_field, text_unit=text_unit, on_error=on_error,
                             bad_bytes=bad_bytes)


class ShardWriter:
    """Write one JSONL shard (optionally zstd-compressed) atomically: it appears whole or not at all."""

    def __init__(self, path: Path, compress: bool = False) -> None:
        self.path, self.compress, self.docs, self.bytes = path, compress, 0, 0
        self._tmp = temp_path_for(path)
        self._raw = self._tmp.open("wb")
        if compress:
            import zstandard

            self._out: IO[bytes] = zstandard.ZstdCompressor(level=3).stream_writer(self._raw, closefd=False)
        else:
            self._out = self._raw

    def write(self, row: dict[str, Any]) -> None:
        self.write_line((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))

    def write_line(self, line: bytes) -> None:
        """One already-encoded JSONL line, newline included."""
        self._out.write(line)
        self.docs += 1
        self.bytes += len(line)

    def close(self) -> None:
        if self.compress:
            self._out.close()
        self._raw.close()
        commit(self._tmp, self.path)

    def abort(self) -> None:
        self._raw.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def read_shard(path: Path) -> Iterator[dict[str, Any]]:
    """Rows of a shard written by `ShardWriter` (plain or `.zst`)."""
    with open_binary(path) as f:
        for raw in f:
            yield json.loads(raw)
