"""What pack reads, token packing and window loading: nothing lost, deterministic, resumable, shardable."""

from __future__ import annotations

import importlib
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.data.clean import Normalize
from lmforge.data.filters import Filters
from lmforge.data.pack import PackedDataset, pack
from lmforge.data.readers import input_files, iter_texts
from lmforge.errors import DataError
from lmforge.tokenizer import Tokenizer, train_tokenizer
from lmforge.train.loaders import WindowLoader

# `from lmforge.data.pack import pack` binds the function; the module is reached by its import name.
pack_module = importlib.import_module("lmforge.data.pack")

TEXTS = [
    "The cat sat on the mat.",
    "def f(x):\n    return x * 2\n",
    "你好，世界！这是一个测试。",
    "Emoji 🙂🚀 and accents: naïve café.",
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit.",
]


def make_corpus(root: Path, n_jsonl: int = 40) -> list[str]:
    """A folder of .txt files and a .jsonl file, plus files the reader must skip; returns the documents."""
    docs = []
    (root / "txt").mkdir(parents=True)
    for i, text in enumerate(TEXTS):
        doc = f"{text} (file {i})"
        (root / "txt" / f"{i}.txt").write_text(doc, encoding="utf-8")
        docs.append(doc)
    with open(root / "rows.jsonl", "w", encoding="utf-8") as f:
        for i in range(n_jsonl):
            doc = f"row {i}: {TEXTS[i % len(TEXTS)]}"
            f.write(json.dumps({"text": doc, "id": i}, ensure_ascii=False) + "\n")
            docs.append(doc)
        f.write("\n")
    (root / "empty.txt").write_text("")
    (root / ".hidden.txt").write_text("hidden document")
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "x.txt").write_text("cached document")
    (root / "image.bin").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    return docs


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tok")
    make_corpus(root / "corpus")
    return train_tokenizer(root / "corpus", root / "tok", vocab_size=320)


def split_documents(tokens: np.ndarray, tok: Tokenizer) -> list[str]:
    assert len(tokens) == 0 or tokens[-1] == tok.eos_id, "every document ends with eos"
    ends = np.flatnonzero(tokens == tok.eos_id)
    starts = np.concatenate(([0], ends[:-1] + 1))
    return [tok.decode(tokens[s:e].tolist()) for s, e in zip(starts, ends, strict=True)]


def read_split(out: Path, split: str) -> np.ndarray:
    meta = json.loads((out / "meta.json").read_text())
    parts = [np.fromfile(out / name, dtype=meta["dtype"]) for name in meta["shards"][split]]
    return np.concatenate(parts) if parts else np.empty(0, dtype=meta["dtype"])


# --- what pack reads (lmforge.data.readers.iter_texts) -------------------------------------------


def test_folder_files_are_sorted_and_skip_hidden_cache_and_binary(tmp_path: Path) -> None:
    make_corpus(tmp_path)
    files = [name for _, name in input_files(tmp_path, text_only=True)]
    assert files == ["empty.txt", "rows.jsonl", *(f"txt/{i}.txt" for i in range(len(TEXTS)))]
    assert input_files(tmp_path, glob="*.jsonl", text_only=True) == [(tmp_path / "rows.jsonl", "rows.jsonl")]


def test_iter_texts_reads_text_files_whole_and_jsonl_per_line(tmp_path: Path) -> None:
    docs = make_corpus(tmp_path)
    assert Counter(iter_texts(tmp_path)) == Counter(docs)


def test_missing_path_no_readable_files_and_a_named_binary_file_are_data_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nowhere: no such file"):
        list(iter_texts(tmp_path / "nowhere"))
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "a.bin").write_bytes(b"\x00\x01")
    with pytest.raises(DataError, match="no readable text files"):
        list(iter_texts(tmp_path / "bin"))
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'bin' / 'a.bin'}: not a text file")):
        list(iter_texts(tmp_path / "bin" / "a.bin"))


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"body": "x"}', "field 'text' missing (found keys: ['body'])"),
        ('{"text": 3}', "field 'text' must be a string, got int"),
        ('["text"]', "expected a JSON object, got list"),
        ('{"text": "x"', "invalid JSON"),
    ],
)
def test_bad_jsonl_rows_name_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "ok"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(f"{path}:2: {message}")):
        list(iter_texts(path))


def test_undecodable_text_file_is_an_error_not_replaced(tmp_path: Path) -> None:
    """Invalid UTF-8 past the 8 KiB sniff is still reported, never silently replaced with U+FFFD."""
    path = tmp_path / "late.txt"
    path.write_bytes(b"a" * 10_000 + b"\nbad \xff byte\n")
    with pytest.raises(DataError, match=re.escape(f"{path}:2: invalid UTF-8")):
        list(iter_texts(path))


def _formats(root: Path, docs: list[str]) -> dict[str, Path]:
    """The same documents as JSONL, CSV, TSV and Parquet, plus a `data clean` output folder of them."""
    import csv

    import pyarrow as pa
    import pyarrow.parquet as pq

    from lmforge.data.pipeline import clean

    root.mkdir(parents=True, exist_ok=True)
    paths = {fmt: root / f"docs.{fmt}" for fmt in ("jsonl", "csv", "tsv", "parquet")}
    paths["jsonl"].write_text("".join(json.dumps({"id": i, "text": d}, ensure_ascii=False) + "\n"
                                      for i, d in enumerate(docs)), encoding="utf-8")
    for fmt, delimiter in (("csv", ","), ("tsv", "\t")):
        with open(paths[fmt], "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f, delimiter=delimiter)
            writer.writerow(["id", "text"])
            writer.writerows(enumerate(docs))
    pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), paths["parquet"])
    paths["clean"] = root / "cleaned"
    clean(paths["jsonl"], paths["clean"], filters=Filters(enabled=False), pii=False, exact_dedup=False,
          normalize=Normalize(unicode=None, fix_mojibake=False, control_chars=False, whitespace=False),
          compress=True, progress=False)
    return paths


FORMAT_DOCS = [*TEXTS, 'She said "hi, there", then left.', "two\nlines, \"quoted\"\n", "tab\tinside"]


def test_csv_tsv_parquet_and_a_clean_folder_pack_to_the_tokens_of_the_same_jsonl(
    tmp_path: Path, tokenizer_dir: Path
) -> None:
    """One reader for every verb: no CSV header or quotes in the text, Parquet read, not refused."""
    paths = _formats(tmp_path / "in", FORMAT_DOCS)
    tok = Tokenizer.load(tokenizer_dir)
    packed = {}
    for fmt, path in paths.items():
        out = pack(path, tokenizer_dir, tmp_path / f"packed-{fmt}", workers=1, val_fraction=0.3)
        packed[fmt] = [read_split(out, split) for split in ("train", "val")]
    assert Counter(split_documents(np.concatenate(packed["jsonl"]), tok)) == Counter(FORMAT_DOCS)
    for fmt in ("csv", "tsv", "parquet", "clean"):
        assert all(np.array_equal(a, b) for a, b in zip(packed[fmt], packed["jsonl"], strict=True)), fmt


def test_paragraph_text_unit_packs_one_document_per_block(tmp_path: Path, tokenizer_dir: Path) -> None:
    (tmp_path / "book.txt").write_text("first block\nstill first\n\nsecond block\n", encoding="utf-8")
    out = pack(tmp_path / "book.txt", tokenizer_dir, tmp_path / "packed", workers=1, val_fraction=0,
               text_unit="paragraph")
    tokens = read_split(out, "train")
    assert split_documents(tokens, Tokenizer.load(tokenizer_dir)) == ["first block\nstill first\n", "second block\n"]
    assert json.loads((out / "meta.json").read_text())["text_unit"] == "paragraph"


def test_a_gz_zst_folder_packs_with_a_glob(tmp_path: Path, tokenizer_dir: Path) -> None:
    import gzip

    import zstandard

    lines = [json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in FORMAT_DOCS]
    (tmp_path / "in" / "sub").mkdir(parents=True)
    with gzip.open(tmp_path / "in" / "sub" / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(lines[:4])
    (tmp_path / "in" / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress("".join(lines[4:]).encode()))
    (tmp_path / "in" / "notes.txt").write_text("not matched by the glob", encoding="utf-8")
    out = pack(tmp_path / "in", tokenizer_dir, tmp_path / "packed", workers=1, val_fraction=0, glob="*.jsonl.*")
    docs = split_documents(read_split(out, "train"), Tokenizer.load(tokenizer_dir))
    assert docs == FORMAT_DOCS[4:] + FORMAT_DOCS[:4]  # sorted paths: b.jsonl.zst before sub/a.jsonl.gz


def test_bad_csv_and_a_missing_column_stop_pack_naming_file_and_line(tmp_path: Path, tokenizer_dir: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text('id,text\n1,fine\n2,"stray "quote",x\n', encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(f"{bad}:3: bad CSV")):
        pack(bad, tokenizer_dir, tmp_path / "p1", workers=1)
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("id,body\n1,fine\n", encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(f"{wrong}:1: column 'text' missing (found columns: ['id', 'body'])")):
        pack(wrong, tokenizer_dir, tmp_path / "p2", workers=1)
    assert not (tmp_path / "p1").exists() and not (tmp_path / "p2").exists()


# --- pack ----------------------------------------------------------------------------------------


def test_pack_meta_matches_shards_and_tokens_decode_to_the_documents(
    tmp_path: Path, tokenizer_dir: Path
) -> None:
    docs = make_corpus(tmp_path / "corpus")
    out = pack(
        tmp_path / "corpus", tokenizer_dir, tmp_path / "packed", workers=1, shard_tokens=64, val_fraction=0.2
    )
    meta = json.loads((out / "meta.json").read_text())
    tok = Tokenizer.load(out / "tokenizer")
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == tok.vocab_size and meta["eos_id"] == tok.eos_id
    assert len(meta["shards"]["train"]) > 1
    decoded = []
    for split in ("train", "val"):
        sizes = [(out / name).stat().st_size // 2 for name in meta["shards"][split]]
        assert all(0 < s <= 64 for s in sizes)
        tokens = read_split(out, split)
        assert meta["tokens"][split] == sum(sizes) == len(tokens) == PackedDataset(out, split).num_tokens
        split_docs = split_documents(tokens, tok)
        assert meta["documents"][split] == len(split_docs) > 0
        decoded += split_docs
    assert Counter(decoded) == Counter(docs)
    assert meta["documents"]["train"] + meta["documents"]["val"] == len(docs)
    assert (out / "tokenizer" / "tokenizer.json").read_bytes() == (
        tokenizer_dir / "tokenizer.json"
    ).read_bytes()


def test_split_is_the_same_with_one_or_two_workers(
    tmp_path: Path, tokenizer_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pack_module, "_BATCH_DOCS", 4)  # several batches, so both workers get some
    make_corpus(tmp_path / "corpus", n_jsonl=60)
    outs = [
        pack(tmp_path / "corpus", tokenizer_dir, tmp_path / f"w{w}", workers=w, val_fraction=0.3)
        for w in (1, 2)
    ]
    metas = [json.loads((o / "meta.json").read_text()) for o in outs]
    assert metas[0] == metas[1]
    for split in ("train", "val"):
        assert np.array_equal(read_split(outs[0], split), read_split(outs[1], split))


def test_tiny_corpus_still_gets_both_splits(tmp_path: Path, tokenizer_dir: Path) -> None:
    corpus = tmp_path / "two.jsonl"
    corpus.write_text('{"text": "first document"}\n{"text": "second document"}\n')
    for fraction in (0.01, 0.99):
        meta = json.loads((pack(corpus, tokenizer_dir, tmp_path / f"p{fraction}") / "meta.json").read_text())
        assert meta["documents"] == {"train": 1, "val": 1}, fraction


def test_no_val_fraction_means_no_val_split(tmp_path: Path, tokenizer_dir: Path) -> None:
    make_corpus(tmp_path / "corpus")
    out = pack(tmp_path / "corpus", tokenizer_dir, tmp_path / "packed", val_fraction=0.0, workers=1)
    assert json.loads((out / "meta.json").read_text())["documents"]["val"] == 0
    with pytest.raises(DataError, match=r"\(val split\): 0 tokens"):
        PackedDataset(out, "val")


def test_pack_refuses_a_non_empty_out_and_leaves_it_untouched(tmp_path: Path, tokenizer_dir: Path) -> None:
    make_corpus(tmp_path / "corpus")
    out = tmp_path / "packed"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(DataError, match="not empty"):
        pack(tmp_path / "corpus", tokenizer_dir, out, workers=1)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"


def test_failed_pack_writes_nothing(tmp_path: Path, tokenizer_dir: Path) -> None:
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "ok"}\n{"txt": "typo"}\n')
    with pytest.raises(DataError, match=re.escape(f"{corpus}:2")):
        pack(corpus, tokenizer_dir, tmp_path / "packed", workers=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl"]


def test_pack_into_an_existing_empty_dir_is_allowed(tmp_path: Path, tokenizer_dir: Path) -> None:
    make_corpus(tmp_path / "corpus")
    (tmp_path / "packed").mkdir()
    assert (pack(tmp_path / "corpus", tokenizer_dir, tmp_path / "packed", workers=1) / "meta.json").is_file()


def test_empty_corpus_is_a_data_error(tmp_path: Path, tokenizer_dir: Path) -> None:
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("")
    (tmp_path / "corpus" / "b.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'corpus'}: no documents")):
        pack(tmp_path / "corpus", tokenizer_dir, tmp_path / "packed", workers=1)
    assert not (tmp_path / "packed").exists()


# --- PackedDataset and WindowLoader ---------------------------------------------------------------


def write_packed(root: Path, n_tokens: int, shard_sizes: list[int] | None = None) -> Path:
    """A packed dir whose token at position i is i, so a window's first token names the window."""
    tokens = np.arange(n_tokens, dtype=np.uint16)
    shard_sizes = shard_sizes or [n_tokens]
    root.mkdir()
    names, start = [], 0
    for i, size in enumerate(shard_sizes):
        tokens[start : start + size].tofile(root / f"train_{i:03d}.bin")
        names.append(f"train_{i:03d}.bin")
        start += size
    meta = {
        "format_version": 1,
        "dtype": "uint16",
        "vocab_size": 65536,
        "eos_id": 0,
        "tokens": {"train": n_tokens},
        "shards": {"train": names, "val": []},
    }
    (root / "meta.json").write_text(json.dumps(meta))
    return root


def test_window_reads_across_shard_boundaries(tmp_path: Path) -> None:
    ds = PackedDataset(write_packed(tmp_path / "p", 100, [30, 1, 40, 29]))
    assert ds.num_tokens == 100
    for start, length in [(0, 100), (25, 10), (29, 3), (30, 1), (70, 30), (99, 1)]:
        assert np.array_equal(ds.window(start, length), np.arange(start, start + length))
    with pytest.raises(IndexError):
        ds.window(95, 10)


def test_packed_dataset_errors_name_the_file_or_split(tmp_path: Path) -> None:
    (tmp_path / "none").mkdir()
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'none' / 'meta.json'}: missing")):
        PackedDataset(tmp_path / "none")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "meta.json").write_text("{not json")
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'bad' / 'meta.json'}: malformed")):
        PackedDataset(tmp_path / "bad")
    with pytest.raises(DataError, match=r"\(test split\): no such split"):
        PackedDataset(write_packed(tmp_path / "p", 10), "test")


def test_targets_are_inputs_shifted_by_one(tmp_path: Path) -> None:
    loader = WindowLoader(PackedDataset(write_packed(tmp_path / "p", 1000)), block_size=16, batch_size=4)
    x, y = loader.next_batch()
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y, x + 1)
    assert torch.all(x[:, 0] % 16 == 0)


def test_every_window_is_visited_once_per_epoch(tmp_path: Path) -> None:
    block, batch = 8, 3
    n_windows = 12
    loader = WindowLoader(
        PackedDataset(write_packed(tmp_path / "p", n_windows * block + 1)), block, batch, seed=3
    )
    assert loader.batches_per_epoch == n_windows // batch
    epochs = []
    for _ in range(2):
        starts = torch.cat([loader.next_batch()[0][:, 0] for _ in range(loader.batches_per_epoch)])
        assert sorted(starts.tolist()) == [w * block for w in range(n_windows)]
        epochs.append(starts.tolist())
    assert epochs[0] != epochs[1], "each epoch draws a new order"


def test_incomplete_last_batch_is_dropped(tmp_path: Path) -> None:
    loader = WindowLoader(PackedDataset(write_packed(tmp_path / "p", 10 * 4 + 1)), 4, 3, shuffle=False)
    batches = [loader.next_batch()[0][:, 0].tolist() for _ in range(4)]
    assert batches == [[0, 4, 8], [12, 16, 20], [24, 28, 32], [0, 4, 8]]
    assert loader.state_dict()["epoch"] == 1


def test_resume_from_state_dict_gives_the_same_batches(tmp_path: Path) -> None:
    ds = PackedDataset(write_packed(tmp_path / "p", 500))
    loader = WindowLoader(ds, 8, 4, seed=7)
    for _ in range(9):
        loader.next_batch()
    state = json.loads(json.dumps(loader.state_dict()))
    expected = [loader.next_batch() for _ in range(20)]
    resumed = WindowLoader(ds, 8, 4, seed=0)
    resumed.load_state_dict(state)
    for (x, y), (rx, ry) in zip(expected, (resumed.next_batch() for _ in range(20)), strict=True):
        assert torch.equal(x, rx) and torch.equal(y, ry)


def test_resume_with_other_block_size_is_refused(tmp_path: Path) -> None:
    ds = PackedDataset(write_packed(tmp_path / "p", 500))
    state = WindowLoader(ds, 8, 4).state_dict()
    with pytest.raises(DataError, match="block_size=8"):
        WindowLoader(ds, 16, 4).load_state_dict(state)


def test_ranks_together_see_the_single_process_batch(tmp_path: Path) -> None:
    ds = PackedDataset(write_packed(tmp_path / "p", 1000))
    single = WindowLoader(ds, 8, 4, seed=1)
    ranks = [WindowLoader(ds, 8, 2, rank=r, world_size=2, seed=1) for r in range(2)]
    for _ in range(3 * single.batches_per_epoch):
        x, y = single.next_batch()
        parts = [loader.next_batch() for loader in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), x)
        assert torch.equal(torch.cat([p[1] for p in parts]), y)


def test_corpus_smaller_than_one_batch_is_a_data_error(tmp_path: Path) -> None:
    ds = PackedDataset(write_packed(tmp_path / "p", 300))
    with pytest.raises(DataError, match=r"300 tokens .* 4×128-token windows; use a smaller --block-size"):
        WindowLoader(ds, 128, 4)


def test_loader_reads_a_packed_corpus(tmp_path: Path, tokenizer_dir: Path) -> None:
    make_corpus(tmp_path / "corpus")
    out = pack(tmp_path / "corpus", tokenizer_dir, tmp_path / "packed", workers=1, shard_tokens=100)
    ds = PackedDataset(out)
    x, y = WindowLoader(ds, 16, 2, shuffle=False).next_batch()
    stream = torch.from_numpy(ds.window(0, 33).astype(np.int64))
    assert torch.equal(x.flatten(), stream[:32]) and torch.equal(y.flatten(), stream[1:33])
