"""Readers and writers: every format, compression, folders and globs, bad input named by file and line."""

from __future__ import annotations

import gzip
import json
import tracemalloc
from pathlib import Path

import pytest
import zstandard

from lmforge.data.readers import ShardWriter, Skip, input_files, read_documents, read_file, read_shard
from lmforge.errors import DataError


def _texts(records) -> list[str]:
    return [r["text"] for r in records if not isinstance(r, Skip)]


def test_text_file_is_one_document_or_blank_line_blocks(tmp_path):
    """A text file is one document, or with text_unit='paragraph' one per blank-line block, ids by start line."""
    p = tmp_path / "a.txt"
    p.write_text("first para\nline two\n\n\nsecond para\n\n", encoding="utf-8")
    assert _texts(read_file(p)) == ["first para\nline two\n\n\nsecond para\n\n"]
    blocks = list(read_file(p, text_unit="paragraph"))
    assert [b["id"] for b in blocks] == ["a.txt:1", "a.txt:5"]
    assert _texts(blocks) == ["first para\nline two\n", "second para\n"]


def test_jsonl_csv_tsv_parquet_read_the_chosen_field(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.jsonl").write_text('{"body": "j1", "n": 1}\n\n{"body": "j2"}\n', encoding="utf-8")
    (tmp_path / "b.csv").write_text('body,other\n"c1, with comma",x\n"c2\nmultiline",y\n', encoding="utf-8")
    (tmp_path / "c.tsv").write_text("other\tbody\nx\tt1\n", encoding="utf-8")
    pq.write_table(pa.table({"body": ["p1", "p2"], "k": [1, 2]}), tmp_path / "d.parquet")
    records = list(read_documents(tmp_path, text_field="body"))
    assert _texts(records) == ["j1", "j2", "c1, with comma", "c2\nmultiline", "t1", "p1", "p2"]
    assert records[0] == {"id": "a.jsonl:1", "n": 1, "text": "j1"}  # other fields travel along
    assert records[3]["id"] == "b.csv:4" and records[3]["other"] == "y"


def test_gz_and_zst_are_decompressed_and_globs_filter_folders(tmp_path):
    rows = b'{"text": "zipped"}\n'
    (tmp_path / "sub").mkdir()
    with gzip.open(tmp_path / "sub" / "a.jsonl.gz", "wb") as f:
        f.write(rows)
    (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(b'{"text": "zstd"}\n'))
    (tmp_path / "notes.md").write_text("not matched", encoding="utf-8")
    assert _texts(read_documents(tmp_path, glob="*.jsonl.*")) == ["zstd", "zipped"]
    assert [name for _, name in input_files(tmp_path, "sub/*")] == ["sub/a.jsonl.gz"]


def test_malformed_jsonl_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "ok"}\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: invalid JSON"):
        list(read_file(p))


def test_on_error_skip_yields_reasons_for_every_bad_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "ok"}\n[1]\n{"title": "x"}\n{"text": 3}\n{"text": "  "}\nnot json\n', encoding="utf-8")
    skips = [(r.id, r.reason) for r in read_file(p, on_error="skip") if isinstance(r, Skip)]
    assert skips == [("bad.jsonl:2", "not-an-object"), ("bad.jsonl:3", "missing-field"),
                     ("bad.jsonl:4", "not-a-string"), ("bad.jsonl:5", "empty"), ("bad.jsonl:6", "invalid-json")]


def test_undecodable_bytes_reported_with_byte_offset_then_replaced_or_skipped(tmp_path):
    p = tmp_path / "latin1.jsonl"
    p.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin1\.jsonl:2: invalid UTF-8 at byte offset 30"):
        list(read_file(p, bad_bytes="raise"))
    notes: list[Skip] = []
    assert _texts(read_file(p, notes=notes)) == ["fine", "caf\ufffd"]
    assert notes[0].reason == "replaced-bytes" and "byte offset 30" in notes[0].detail
    skipped = [r for r in read_file(p, bad_bytes="skip") if isinstance(r, Skip)]
    assert [(s.id, s.reason) for s in skipped] == [("latin1.jsonl:2", "undecodable")]


def test_missing_csv_column_and_missing_path_are_clear_errors(tmp_path):
    (tmp_path / "a.csv").write_text("title\nx\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"a\.csv:1: column 'text' missing"):
        list(read_file(tmp_path / "a.csv"))
    with pytest.raises(DataError, match="no such file"):
        input_files(tmp_path / "nope")


def test_corrupt_compressed_file_is_skipped_as_unreadable(tmp_path):
    p = tmp_path / "broken.jsonl.gz"
    p.write_bytes(b"\x1f\x8b\x08\x00garbage")
    (rec,) = read_file(p, on_error="skip")
    assert isinstance(rec, Skip) and rec.reason == "unreadable"
    with pytest.raises(DataError, match=r"broken\.jsonl\.gz: cannot read"):
        list(read_file(p))


def test_shard_writer_round_trips_and_is_atomic(tmp_path):
    with ShardWriter(tmp_path / "part.jsonl.zst", compress=True) as w:
        w.write({"id": "1", "text": "héllo"})
    assert list(read_shard(tmp_path / "part.jsonl.zst")) == [{"id": "1", "text": "héllo"}]
    with pytest.raises(RuntimeError), ShardWriter(tmp_path / "never.jsonl") as w:
        w.write({"text": "x"})
        raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part.jsonl.zst"]  # no partial file, no temp


def _write_corpus(path: Path, mb: float) -> None:
    line = (json.dumps({"text": "The quick brown fox jumps over the lazy dog. " * 20}) + "\n").encode()
    with open(path, "wb") as f:
        for _ in range(int(mb * 1e6 / len(line))):
            f.write(line)


def _peak_reading(path: Path, out: Path) -> int:
    tracemalloc.start()
    with ShardWriter(out) as w:
        for rec in read_file(path):
            w.write(rec)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def test_memory_stays_flat_as_the_input_grows(tmp_path):
    """Reading and writing 8 MB peaks at the same memory as 2 MB: both far below the corpus size."""
    _write_corpus(tmp_path / "small.jsonl", 2)
    _write_corpus(tmp_path / "large.jsonl", 8)
    small = _peak_reading(tmp_path / "small.jsonl", tmp_path / "s.jsonl")
    large = _peak_reading(tmp_path / "large.jsonl", tmp_path / "l.jsonl")
    assert large < 1_000_000 and large < 1.5 * small + 100_000
