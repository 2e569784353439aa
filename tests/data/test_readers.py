"""THE reader and the shard writer: every format, compression, folders and globs, manifests, the three faces
(documents, strict texts, rows), bad input named by file and line."""

from __future__ import annotations

import gzip
import json
import re
import tracemalloc
from pathlib import Path

import pytest
import zstandard

from lmforge.data.readers import (
    ShardWriter,
    Skip,
    count_documents,
    input_files,
    iter_texts,
    read_documents,
    read_file,
    read_rows,
    read_shard,
)
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
    assert records[3]["id"] == "b.csv:3" and records[3]["other"] == "y"  # the line a multi-line row starts on


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


# --- iter_texts: the strict face of tokenizer train, data pack and eval perplexity -------------------


def _every_format(root: Path, docs: list[str]) -> None:
    """`docs` once per format, in files whose sorted order is the order of the formats below."""
    import csv

    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir(parents=True, exist_ok=True)
    (root / "1.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in docs), encoding="utf-8")
    for name, delimiter in (("2.csv", ","), ("3.tsv", "\t")):
        with open(root / name, "w", encoding="utf-8", newline="") as f:
            csv.writer(f, delimiter=delimiter).writerows([["n", "body"], *([i, d] for i, d in enumerate(docs))])
    pq.write_table(pa.table({"body": docs}), root / "4.parquet")
    with gzip.open(root / "5.csv.gz", "wb") as f:
        f.write((root / "2.csv").read_bytes())
    (root / "6.tsv.zst").write_bytes(zstandard.ZstdCompressor().compress((root / "3.tsv").read_bytes()))
    (root / "7.jsonl.gz").write_bytes(gzip.compress((root / "1.jsonl").read_bytes()))


def test_iter_texts_reads_the_text_column_of_every_format_and_compression(tmp_path):
    docs = ['with "quotes", and commas', "two\nlines", "tab\there", "naïve 你好 🙂"]
    _every_format(tmp_path, docs)
    assert list(iter_texts(tmp_path, text_field="body")) == docs * 7
    assert count_documents(tmp_path) == len(docs) * 7 + 4  # an estimate: a quoted newline counts as a CSV row
    assert count_documents(tmp_path, cap=5) == 5


def test_iter_texts_skips_blank_documents_and_blank_rows(tmp_path):
    (tmp_path / "a.csv").write_text('text,n\n"  ",1\n,\nkept,2\n\n', encoding="utf-8")
    (tmp_path / "b.txt").write_text("\n \n", encoding="utf-8")
    (tmp_path / "c.jsonl").write_text('{"text": ""}\n\n{"text": "also kept"}\n', encoding="utf-8")
    assert list(iter_texts(tmp_path)) == ["kept", "also kept"]


def test_iter_texts_errors_name_the_path_given_and_carry_no_clean_option_hints(tmp_path):
    p = tmp_path / "rows.jsonl"
    p.write_text('{"text": "ok"}\n{"text": 1}\n', encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(f"{p}:2: field 'text' must be a string, got int")) as err:
        list(iter_texts(tmp_path))
    assert "--on-error" not in str(err.value)
    p.write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=re.escape(f"{p}:1: invalid UTF-8 at byte offset 13")) as err:
        list(iter_texts(p))
    assert "bad_bytes" not in str(err.value)


def test_iter_texts_leaves_binary_files_in_folders_out_and_refuses_a_named_one(tmp_path):
    (tmp_path / "doc.txt").write_text("words", encoding="utf-8")
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9")
    (tmp_path / "archive.tar.gz").write_bytes(gzip.compress(b"a\x00b"))
    (tmp_path / "rows.jsonl.gz").write_bytes(gzip.compress(b'{"text": "zipped"}\n'))
    assert list(iter_texts(tmp_path)) == ["words", "zipped"]
    with pytest.raises(DataError, match=r"image\.png: not a text file \(NUL bytes"):
        list(iter_texts(tmp_path / "image.png"))
    # read_documents reads everything, so `clean` can account for (and salvage) what a folder holds.
    assert [name for _, name in input_files(tmp_path)] == ["archive.tar.gz", "doc.txt", "image.png", "latin1.txt",
                                                          "rows.jsonl.gz"]


def test_iter_texts_on_a_clean_manifest_folder_reads_its_shards_not_its_logs(tmp_path):
    from lmforge.data.filters import Filters
    from lmforge.data.pipeline import clean

    (tmp_path / "raw.jsonl").write_text("".join(json.dumps({"text": f"doc {i} " * 60}) + "\n" for i in range(3)),
                                        encoding="utf-8")
    clean(tmp_path / "raw.jsonl", tmp_path / "out", filters=Filters(enabled=False), compress=True, progress=False)
    assert {"manifest.json", "skipped.jsonl", "clusters.jsonl"} <= {p.name for p in (tmp_path / "out").iterdir()}
    assert [t.split()[1] for t in iter_texts(tmp_path / "out")] == ["0", "1", "2"]


def test_paragraph_unit_in_iter_texts(tmp_path):
    (tmp_path / "a.txt").write_text("one\n\n\ntwo\nlines\n", encoding="utf-8")
    assert list(iter_texts(tmp_path / "a.txt", text_unit="paragraph")) == ["one\n", "two\nlines\n"]


# --- read_rows: the rows face of SFT and labelled data ---------------------------------------------------


def test_read_rows_numbers_rows_by_the_line_they_start_on(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.csv").write_text('text,label\n"multi\nline",x\n\n,\nsolo,y\n', encoding="utf-8")
    assert list(read_rows(tmp_path / "a.csv")) == [(2, {"text": "multi\nline", "label": "x"}),
                                                   (6, {"text": "solo", "label": "y"})]
    (tmp_path / "a.tsv").write_text("text\tlabel\na, b\t1\n", encoding="utf-8")
    assert list(read_rows(tmp_path / "a.tsv")) == [(2, {"text": "a, b", "label": "1"})]
    pq.write_table(pa.table({"text": ["p", "q"], "score": [1.5, 2.0]}), tmp_path / "a.parquet")
    assert list(read_rows(tmp_path / "a.parquet")) == [(1, {"text": "p", "score": 1.5}),
                                                       (2, {"text": "q", "score": 2.0})]


def test_a_spreadsheet_csv_with_a_byte_order_mark_has_clean_column_names(tmp_path):
    (tmp_path / "excel.csv").write_bytes("\ufefftext,label\r\ncafé,x\r\n".encode())
    assert list(read_rows(tmp_path / "excel.csv")) == [(2, {"text": "café", "label": "x"})]
    assert list(iter_texts(tmp_path / "excel.csv")) == ["café"]


def test_read_rows_of_compressed_jsonl_equal_the_plain_file(tmp_path):
    rows = [{"prompt": "2+2?", "completion": "4"}, {"prompt": "3+3?", "completion": "6"}]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (tmp_path / "a.jsonl").write_text(text)
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.write(text)
    (tmp_path / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(text.encode()))
    expected = [(1, rows[0]), (2, rows[1])]
    for name in ("a.jsonl", "a.jsonl.gz", "a.jsonl.zst"):
        assert list(read_rows(tmp_path / name)) == expected, name


@pytest.mark.parametrize(("name", "content", "message"), [
    ("a.csv", 'text,label\nok,1\nbad,1,extra\n', "a.csv:3: 3 fields, header has 2"),
    ("b.csv", 'text,label\nok,1\n"open quote,1\n', "b.csv:3: unterminated quote"),
    ("c.csv", 'text,label\nok,1\n"x"y,1\n', "c.csv:3: bad CSV"),
    ("d.jsonl", '{"a": 1}\n\n[1]\n', "d.jsonl:3: expected a JSON object, got list"),
    ("e.jsonl", '{"a": 1}\n{"a": \n', "e.jsonl:2: invalid JSON"),
    ("f.txt", "just text\n", "f.txt: expected rows: a .jsonl, .csv, .tsv or .parquet file"),
])
def test_read_rows_errors_name_file_and_line(tmp_path, name, content, message):
    (tmp_path / name).write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(message)):
        list(read_rows(tmp_path / name))


def test_read_rows_on_error_skip_lists_every_bad_line(tmp_path):
    p = tmp_path / "l.jsonl"
    p.write_text('{"a": 1}\n{oops\n[2]\n{"a": 3}\n', encoding="utf-8")
    got = [(line, row.reason if isinstance(row, Skip) else row) for line, row in read_rows(p, on_error="skip")]
    assert got == [(1, {"a": 1}), (2, "invalid-json"), (3, "not-an-object"), (4, {"a": 3})]


def test_read_rows_of_a_missing_or_corrupt_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: no such file"):
        list(read_rows(tmp_path / "nope.jsonl"))
    (tmp_path / "broken.csv.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(DataError, match=r"broken\.csv\.gz: cannot read"):
        list(read_rows(tmp_path / "broken.csv.gz"))


def test_labelled_rows_read_alike_from_jsonl_csv_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lmforge.data.labelled import read_labelled

    (tmp_path / "l.jsonl").write_text('{"text": "a", "label": 1, "score": "2.5"}\n{"text": "b", "label": "x", '
                                      '"score": 3}\n', encoding="utf-8")
    (tmp_path / "l.csv").write_text("text,label,score\na,1,2.5\nb,x,3\n", encoding="utf-8")
    pq.write_table(pa.table({"text": ["a", "b"], "label": ["1", "x"], "score": [2.5, 3.0]}), tmp_path / "l.parquet")
    for name, lines in (("l.jsonl", [1, 2]), ("l.csv", [2, 3]), ("l.parquet", [1, 2])):
        rows = read_labelled(tmp_path / name, "text", "label", "classify")
        assert rows == [(lines[0], "a", "1"), (lines[1], "b", "x")], name
    assert [t for _, _, t in read_labelled(tmp_path / "l.csv", "text", "score", "regress")] == [2.5, 3.0]
    assert read_labelled(tmp_path / "l.csv", "text", None, "classify") == [(2, "a", None), (3, "b", None)]
    (tmp_path / "bad.csv").write_text("text,label\na,1\n,2\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.csv:3: field 'text' is empty or not a string"):
        read_labelled(tmp_path / "bad.csv", "text", "label", "classify")
    with pytest.raises(DataError, match=r"l\.csv:3: field 'label' is 'x', not a number"):
        read_labelled(tmp_path / "l.csv", "text", "label", "regress")


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
