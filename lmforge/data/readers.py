"""THE corpus reader: every verb that reads text or rows reads it here, so all of them agree on formats.

Formats, by suffix (under any `.gz` / `.zst`, decompressed as a stream):
    text      any other suffix: one document per file, or per blank-line block (text_unit="paragraph")
    JSONL     .jsonl, .ndjson, .json: one JSON object per line; the text is a field
    CSV, TSV  .csv, .tsv: a header row, then one record per row (quoted fields may span lines)
    Parquet   .parquet: one record per row; the text is a column
An input is a file, a folder (searched recursively in sorted order, hidden entries pruned, `glob` matched
on the relative path) or a list of them; a folder written by `data clean` / `data dedup` stands for the
shards its manifest.json lists.

Three faces over one implementation:
    read_documents  records (a dict with `id`, `text` and the row's other fields) or a `Skip` saying why a
                    document could not be read: nothing is dropped silently, so `clean` can account for every
                    input document;
    iter_texts      the non-empty texts alone, strictly: bad input is a DataError naming file:line
                    (`tokenizer train`, `data pack`, `eval perplexity`);
    read_rows       (line, row) of one JSONL / CSV / TSV / Parquet file (SFT and labelled data).
Files are read line by line (batch by batch for Parquet), so memory stays flat however large the corpus;
a plain-text file read as one document is the one exception.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import json
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal, overload

from lmforge.errors import DataError
from lmforge.io import commit, temp_path_for

TextUnit = Literal["file", "paragraph"]
OnError = Literal["raise", "skip"]
BadBytes = Literal["replace", "skip", "raise"]
Inputs = str | Path | Sequence[str | Path]

_COMPRESSED = {".gz", ".zst"}
_JSONL = {".jsonl", ".ndjson", ".json"}
_SNIFF_BYTES = 8192
_SKIPPED_NAMES = {"__pycache__"}


@dataclass(frozen=True)
class Skip:
    """An input document that could not be read: `id` is `file:line` (or `file`), `reason` a short key."""

    id: str
    reason: str
    detail: str

    def as_row(self) -> dict[str, str]:
        return {"id": self.id, "reason": self.reason, "detail": self.detail}


Record = dict[str, Any] | Skip
Row = tuple[int, dict[str, Any]]  # (line it starts on, or Parquet row number; the row)
MaybeRow = tuple[int, dict[str, Any] | Skip]


# --- which files -------------------------------------------------------------------------------------


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


def _unreadable(e: Exception) -> bool:
    """Truncated, corrupt or unreadable files; pyarrow and zstandard raise their own exception types."""
    return isinstance(e, (OSError, EOFError)) or type(e).__module__.split(".")[0] in {"pyarrow", "zstandard", "zstd"}


def _is_binary(path: Path, *, utf8: bool = True) -> bool:
    """A NUL byte (or, with `utf8`, invalid UTF-8) in the first 8 KiB, decompressed, means not text.

    Parquet is never text but always read. A file that cannot even be sniffed is left to the reader,
    which names the problem.
    """
    if file_format(path) == "parquet":
        return False
    try:
        with open_binary(path) as f:
            head = f.read(_SNIFF_BYTES)
    except Exception as e:
        if not _unreadable(e):
            raise
        return False
    if b"\x00" in head:
        return True
    if not utf8:
        return False
    try:
        # Not final when cut at 8 KiB: the cut may fall inside a multi-byte character, which is not an error.
        codecs.getincrementaldecoder("utf-8")().decode(head, final=len(head) < _SNIFF_BYTES)
    except UnicodeDecodeError:
        return True
    return False


def _hidden(name: str) -> bool:
    return name.startswith(".") or name in _SKIPPED_NAMES


def _walk(root: Path, glob: str | None) -> list[Path]:
    """Files under `root` in sorted order; hidden folders are pruned, not walked (think `.git`, `.venv`)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not _hidden(d)]
        for name in filenames:
            f = Path(dirpath, name)
            if not _hidden(name) and f.is_file() and (glob is None or f.relative_to(root).match(glob)):
                found.append(f)
    return sorted(found)


def _manifest_shards(root: Path) -> list[Path] | None:
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


def input_files(input: Inputs, glob: str | None = None, *, text_only: bool = False) -> list[tuple[Path, str]]:
    """(path, display name) for every file under `input`, sorted so every run sees one order.

    The display name, relative to the folder given, names documents in ids. With `text_only`, files in
    folders that are not UTF-8 text are left out, and a file named explicitly that holds NUL bytes is an
    error (other bad bytes are left to the reader, which names their line); without it every file is read,
    so `clean` accounts for (and, with bad_bytes="replace", salvages) whatever a folder holds.
    """
    roots = [input] if isinstance(input, (str, Path)) else list(input)
    if not roots:
        raise DataError("no input paths given")
    found: list[tuple[Path, str]] = []
    for root in map(Path, roots):
        if root.is_file():
            if text_only and _is_binary(root, utf8=False):
                raise DataError(f"{root}: not a text file (NUL bytes in the first 8 KiB); expected text, JSONL, "
                                "CSV/TSV or Parquet, optionally .gz/.zst")
            found.append((root, root.name))
        elif root.is_dir():
            files = _manifest_shards(root) if glob is None else None
            if files is None:
                files = [f for f in _walk(root, glob) if not (text_only and _is_binary(f))]
            if not files:
                what = "readable text files" if text_only else "files"
                raise DataError(f"{root}: no {what}{f' matching {glob!r}' if glob else ''} in this folder")
            found += [(f, str(f.relative_to(root))) for f in files]
        else:
            raise DataError(f"{root}: no such file or directory")
    return found


# --- how bad input is handled --------------------------------------------------------------------------


class _Policy:
    """What to do with bad bytes and malformed lines of one file; problems are named file:line."""

    def __init__(self, name: str, on_error: OnError, bad_bytes: BadBytes, notes: list[Skip] | None = None,
                 hints: bool = True) -> None:
        self.name, self.on_error, self.bad_bytes, self.hints = name, on_error, bad_bytes, hints
        self.notes = notes  # lines whose undecodable bytes became U+FFFD: kept, but logged

    def decode(self, raw: bytes, line_no: int, offset: int) -> str | Skip:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            where = f"{self.name}:{line_no}"
            detail = f"invalid UTF-8 at byte offset {offset + e.start}"
            if self.bad_bytes == "raise":
                hint = " (bad_bytes='raise'; 'replace' or 'skip' to go on)" if self.hints else ""
                raise DataError(f"{where}: {detail}{hint}") from None
            if self.bad_bytes == "skip":
                return Skip(where, "undecodable", detail)
            if self.notes is not None:
                self.notes.append(Skip(where, "replaced-bytes", detail))
            return raw.decode("utf-8", errors="replace")

    def fail(self, skip: Skip) -> Skip:
        if self.on_error == "raise":
            hint = " (pass --on-error skip to log such lines and go on)" if self.hints else ""
            raise DataError(f"{skip.id}: {skip.detail}{hint}")
        return skip


def _lines(stream: IO[bytes]) -> Iterator[tuple[int, int, bytes]]:
    """(line number, byte offset of the line, raw line) over a byte stream."""
    offset = 0
    for line_no, raw in enumerate(stream, start=1):
        yield line_no, offset, raw
        offset += len(raw)


# --- rows: JSONL, CSV / TSV, Parquet ---------------------------------------------------------------------


def _jsonl_rows(stream: IO[bytes], policy: _Policy) -> Iterator[MaybeRow]:
    for line_no, offset, raw in _lines(stream):
        if not raw.strip():
            continue
        line = policy.decode(raw, line_no, offset)
        if isinstance(line, Skip):
            yield line_no, line
            continue
        where = f"{policy.name}:{line_no}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            yield line_no, policy.fail(Skip(where, "invalid-json", f"invalid JSON ({e.msg} at column {e.colno})"))
            continue
        if not isinstance(row, dict):
            row = policy.fail(Skip(where, "not-an-object", f"expected a JSON object, got {type(row).__name__}"))
        yield line_no, row


def _csv_rows(stream: IO[bytes], policy: _Policy, delimiter: str, column: str | None) -> Iterator[MaybeRow]:
    """Rows as {header: value}, numbered by the line they start on (a quoted field may span lines).

    Blank rows are skipped like blank JSONL lines; `column`, when given, must be in the header.
    """
    skips: list[MaybeRow] = []
    start = 0  # line the row being parsed starts on

    def decoded() -> Iterator[str]:
        nonlocal start
        for line_no, offset, raw in _lines(stream):
            line = policy.decode(raw, line_no, offset)
            if isinstance(line, Skip):
                skips.append((line_no, line))
                continue
            start = start or line_no
            yield line

    csv.field_size_limit(sys.maxsize)
    # strict: a stray quote is an error naming its line, not a silently merged field.
    reader = csv.reader(decoded(), delimiter=delimiter, strict=True)
    try:
        header = next(reader, None)
    except csv.Error as e:
        raise DataError(f"{policy.name}:1: unreadable header row ({e})") from None
    yield from skips
    skips.clear()
    if header is None:
        return
    if header:
        header[0] = header[0].removeprefix("\ufeff")  # the byte-order mark of Excel's "CSV UTF-8"
    if column is not None and column not in header:
        raise DataError(f"{policy.name}:1: column {column!r} missing (found columns: {header})")
    while True:
        start = 0
        try:
            values = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            yield from skips
            skips.clear()
            line_no = start or reader.line_num
            detail = (f"unterminated quote: the quoted field that starts on line {line_no} is never closed"
                      if "unexpected end of data" in str(e) else f"bad CSV ({e})")
            yield line_no, policy.fail(Skip(f"{policy.name}:{line_no}", "invalid-csv", detail))
            continue
        yield from skips
        skips.clear()
        if not any(values):
            continue
        if len(values) != len(header):
            yield start, policy.fail(Skip(f"{policy.name}:{start}", "invalid-csv",
                                          f"{len(values)} fields, header has {len(header)} ({header})"))
            continue
        yield start, dict(zip(header, values))
    yield from skips


def _parquet_rows(path: Path, policy: _Policy, column: str | None) -> Iterator[Row]:
    """Rows numbered from 1 in file order, read a batch at a time."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    if column is not None and column not in names:
        raise DataError(f"{policy.name}: column {column!r} missing (found columns: {names})")
    row_no = 0
    for batch in pf.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            row_no += 1
            yield row_no, row


def _rows(path: Path, fmt: str, policy: _Policy, column: str | None = None) -> Iterator[MaybeRow]:
    if fmt == "parquet":
        yield from _parquet_rows(path, policy, column)
        return
    with open_binary(path) as stream:
        if fmt == "jsonl":
            yield from _jsonl_rows(stream, policy)
        else:
            yield from _csv_rows(stream, policy, "," if fmt == "csv" else "\t", column)


@overload
def read_rows(path: str | Path, *, on_error: Literal["raise"] = "raise") -> Iterator[Row]: ...
@overload
def read_rows(path: str | Path, *, on_error: Literal["skip"]) -> Iterator[MaybeRow]: ...
def read_rows(path: str | Path, *, on_error: OnError = "raise") -> Iterator[MaybeRow]:
    """(line, row) for every record of a JSONL, CSV/TSV or Parquet file (also .gz/.zst).

    The line is where the record starts (for Parquet, its row number from 1); CSV values are strings.
    Bad UTF-8, bad JSON, a non-object line or a row with the wrong number of fields is a DataError naming
    file:line, or with on_error="skip" comes back as (line, Skip) so a checker can list every bad line.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    fmt = file_format(path)
    if fmt == "text":
        raise DataError(f"{path}: expected rows: a .jsonl, .csv, .tsv or .parquet file (optionally .gz / .zst)")
    policy = _Policy(str(path), on_error, "skip" if on_error == "skip" else "raise", hints=False)
    try:
        yield from _rows(path, fmt, policy)
    except Exception as e:
        if not _unreadable(e):
            raise
        raise DataError(f"{path}: cannot read: {e}") from None


# --- documents -------------------------------------------------------------------------------------------


def _document(row: dict[str, Any], where: str, field: str, policy: _Policy) -> Record:
    if field not in row:
        return policy.fail(Skip(where, "missing-field", f"field {field!r} missing (found keys: {sorted(row)})"))
    text = row.pop(field)
    if not isinstance(text, str):
        return policy.fail(Skip(where, "not-a-string", f"field {field!r} must be a string, got {type(text).__name__}"))
    return {"id": where, **row, "text": text}


def _text_documents(stream: IO[bytes], unit: TextUnit, policy: _Policy) -> Iterator[Record]:
    name = policy.name
    if unit == "file":
        raw = stream.read()
        text = policy.decode(raw, raw.count(b"\n", 0, _first_bad(raw)) + 1, 0)
        yield text if isinstance(text, Skip) else {"id": name, "text": text}
        return
    block: list[str] = []
    start = 0
    for line_no, offset, raw in _lines(stream):
        line = policy.decode(raw, line_no, offset)
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


def _documents(path: Path, fmt: str, field: str, unit: TextUnit, policy: _Policy) -> Iterator[Record]:
    if fmt == "text":
        with open_binary(path) as stream:
            yield from _text_documents(stream, unit, policy)
        return
    sep = "#" if fmt == "parquet" else ":"  # Parquet ids count rows, the others count lines
    for line_no, row in _rows(path, fmt, policy, column=field):
        yield row if isinstance(row, Skip) else _document(row, f"{policy.name}{sep}{line_no}", field, policy)


def read_file(path: Path, name: str | None = None, *, text_field: str = "text", text_unit: TextUnit = "file",
              on_error: OnError = "raise", bad_bytes: BadBytes = "replace", notes: list[Skip] | None = None,
              hints: bool = True) -> Iterator[Record]:
    """Stream the records of one file (see the module docstring); empty documents become `Skip("empty")`.

    With `bad_bytes="replace"`, each line whose bytes were replaced is appended to `notes` (if given).
    `hints` adds the `data clean` option that would go on past an error to its message.
    """
    name = name or path.name
    policy = _Policy(name, on_error, bad_bytes, notes, hints)
    try:
        for r in _documents(path, file_format(path), text_field, text_unit, policy):
            if not isinstance(r, Skip) and not r["text"].strip():
                yield Skip(r["id"], "empty", "document is empty or whitespace only")
            else:
                yield r
    except Exception as e:
        # Unreadable, truncated or corrupt files: the rest of this file cannot be trusted.
        if not _unreadable(e):
            raise
        yield policy.fail(Skip(name, "unreadable", f"cannot read: {e}"))


def read_documents(input: Inputs, *, glob: str | None = None, text_field: str = "text",
                   text_unit: TextUnit = "file", on_error: OnError = "raise",
                   bad_bytes: BadBytes = "replace") -> Iterator[Record]:
    """Every record under `input` (files, folders, compressed or not), file by file in sorted order."""
    for path, name in input_files(input, glob):
        yield from read_file(path, name, text_field=text_field, text_unit=text_unit, on_error=on_error,
                             bad_bytes=bad_bytes)


def iter_texts(data: Inputs, *, text_field: str = "text", glob: str | None = None,
               text_unit: TextUnit = "file") -> Iterator[str]:
    """Every non-blank document text under `data`, strictly, in `read_documents` order.

    What training and evaluation read: binary files in folders are left out (a named one is an error), and
    a malformed line, a missing field or undecodable bytes is a DataError naming the file by the path given
    and its line, never a silently dropped or altered document.
    """
    for path, _ in input_files(data, glob, text_only=True):
        for rec in read_file(path, str(path), text_field=text_field, text_unit=text_unit, on_error="raise",
                             bad_bytes="raise", hints=False):
            if not isinstance(rec, Skip):  # strict: the only Skip left is an empty document
                yield rec["text"]


def count_documents(data: Inputs, *, glob: str | None = None, cap: int | None = None) -> int:
    """About how many documents `iter_texts` yields (a row per line, a text file as one), for progress bars."""
    total = 0
    for path, _ in input_files(data, glob, text_only=True):
        fmt = file_format(path)
        try:
            if fmt == "parquet":
                import pyarrow.parquet as pq

                total += pq.ParquetFile(path).metadata.num_rows
            elif fmt == "text":
                total += 1
            else:
                with open_binary(path) as f:
                    lines = sum(chunk.count(b"\n") for chunk in iter(lambda f=f: f.read(1 << 20), b""))
                total += lines - (fmt != "jsonl")  # the CSV / TSV header row
        except Exception as e:
            if not _unreadable(e):
                raise
            raise DataError(f"{path}: cannot read: {e}") from None
        if cap is not None and total >= cap:
            return cap
    return total


# --- shards: what `clean` and `dedup` write ---------------------------------------------------------------


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

