"""Token shards: tokenize a corpus once into flat memory-mapped arrays, then read training windows from them.

Pretraining reads fixed-length windows of one long token stream in which documents are separated by eos
(GPT-2 style packing, Radford et al. 2019), so no token is wasted on padding. The stream is stored as raw
uint16/uint32 arrays that np.memmap maps without loading, so a corpus larger than RAM trains fine.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import multiprocessing as mp
import multiprocessing.pool
import os
import shutil
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.data.fim import FimConfig, Sentinels, is_code_corpus, transform
from lmforge.data.readers import TextUnit, iter_texts
from lmforge.errors import ConfigError, DataError
from lmforge.io import atomic_write_bytes, atomic_write_json
from lmforge.progress import Progress
from lmforge.tokenizer import Tokenizer

FORMAT_VERSION = 1
_BATCH_DOCS = 1024
_BATCH_CHARS = 1 << 20

_worker: dict[str, Any] = {}


def _is_val(text: str, seed: int, val_fraction: float) -> bool:
    """A stable hash of the text, not a random draw, so the split ignores worker count and corpus order."""
    digest = hashlib.blake2b(f"{seed}\0{text}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < val_fraction


def _init_worker(tokenizer_dir: str, dtype: str, seed: int, val_fraction: float,
                 fim: tuple[FimConfig, Sentinels] | None, in_process: bool) -> None:
    if not in_process:
        # One process per core already; tokenizers' own threads would only oversubscribe them.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tok = Tokenizer.load(tokenizer_dir)
    _worker.update(tok=tok, dtype=np.dtype(dtype), seed=seed, val_fraction=val_fraction, fim=fim)


def _encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Tokens of a batch of documents, each followed by eos, as (flat tokens, lengths, is_val, FIM examples)."""
    tok: Tokenizer = _worker["tok"]
    encoded = tok.encode_batch(texts)
    is_val = np.array([_is_val(t, _worker["seed"], _worker["val_fraction"]) for t in texts], dtype=bool)
    fim_examples = 0
    if _worker["fim"] is not None:  # training documents only: validation stays left-to-right, comparable
        cfg, sentinels = _worker["fim"]
        for i, text in enumerate(texts):
            if not is_val[i]:
                ids, n = transform(text, encoded[i], lambda parts: tok.encode_batch(parts, add_bos=False),
                                   sentinels, cfg, _worker["seed"])
                if n:
                    encoded[i] = [*encoded[i][:1], *ids] if encoded[i][:1] == [tok.bos_id] else ids
                    fim_examples += n
    lengths = np.array([len(ids) + 1 for ids in encoded], dtype=np.int64)
    flat = np.fromiter(
        chain.from_iterable([*ids, tok.eos_id] for ids in encoded),
        dtype=_worker["dtype"],
        count=int(lengths.sum()),
    )
    return flat, lengths, is_val, fim_examples


def _batches(documents: Iterable[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    chars = 0
    for doc in documents:
        batch.append(doc)
        chars += len(doc)
        if len(batch) >= _BATCH_DOCS or chars >= _BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _pool(workers: int, init_args: tuple) -> mp.pool.Pool:
    """A pool of tokenizer processes, forked where the OS can.

    Forked workers share the parent's imports (torch among them) instead of each paying seconds and
    hundreds of MB to re-import them, and scripts without an `if __name__ == "__main__"` guard still work.
    """
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    # Workers tokenize single-threaded; saying so before the fork also silences tokenizers' fork warning.
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        return mp.get_context(method).Pool(workers, initializer=_init_worker, initargs=(*init_args, False))
    finally:
        if saved is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved


def _encoded(batches: Iterable[list[str]], workers: int, init_args: tuple) -> Iterator[tuple]:
    """Encode batches in order; at most 2 per worker in flight, so memory stays flat on any corpus size."""
    if workers == 1:
        _init_worker(*init_args, True)
        try:
            yield from map(_encode, batches)
        finally:
            _worker.clear()
        return
    with _pool(workers, init_args) as pool:
        pending: deque = deque()
        for batch in batches:
            pending.append(pool.apply_async(_encode, (batch,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


class _ShardWriter:
    """Appends documents to `{prefix}_000.bin`, `{prefix}_001.bin`, ... of at most shard_tokens each."""

    def __init__(self, directory: Path, prefix: str, shard_tokens: int):
        self.directory, self.prefix, self.shard_tokens = directory, prefix, shard_tokens
        self.buffer: list[np.ndarray] = []
        self.buffered = 0
        self.shards: list[str] = []
        self.tokens = 0
        self.documents = 0

    def add(self, tokens: np.ndarray) -> None:
        self.buffer.append(tokens)
        self.buffered += len(tokens)
        self.tokens += len(tokens)
        self.documents += 1
        if self.buffered >= self.shard_tokens:
            flat = np.concatenate(self.buffer)
            full = len(flat) // self.shard_tokens * self.shard_tokens
            for start in range(0, full, self.shard_tokens):
                self._write(flat[start : start + self.shard_tokens])
            self.buffer = [flat[full:]]
            self.buffered = len(flat) - full

    def close(self) -> None:
        if self.buffered:
            self._write(np.concatenate(self.buffer))
        self.buffer, self.buffered = [], 0

    def _write(self, tokens: np.ndarray) -> None:
        name = f"{self.prefix}_{len(self.shards):03d}.bin"
        atomic_write_bytes(self.directory / name, tokens.tobytes())
        self.shards.append(name)


def _refuse_nonempty(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out}: already exists and is not empty; choose another --out or remove it first")


def pack(
    data: Path,
    tokenizer: Path,
    out: Path = Path("packed"),
    *,
    text_field: str = "text",
    glob: str | None = None,
    text_unit: TextUnit = "file",
    val_fraction: float = 0.01,
    workers: int | None = None,
    seed: int = 0,
    shard_tokens: int = 2**26,
    fim_rate: float | None = None,
    fim_spm_rate: float = 0.5,
    fim_span_tokens: int = 128,
) -> Path:
    """Tokenize a corpus into memory-mapped token shards for pretraining.

    Every document is followed by the tokenizer's end-of-text token. A document goes to the validation
    split by a hash of its text, so the split is the same on every run and with any number of workers;
    a corpus of two or more documents always gets at least one validation document.

    Args:
        data: A text, JSONL, CSV/TSV or Parquet file (optionally .gz/.zst), a folder searched recursively
            for them, or a folder written by `data clean` / `data dedup`.
        tokenizer: Directory holding tokenizer.json (from `lmforge tokenizer train`, a checkpoint, or HF).
        out: Directory to create; refused if it exists and is not empty.
        text_field: The JSONL field / CSV or Parquet column holding the text.
        glob: Only read files matching this pattern, e.g. "*.jsonl".
        text_unit: For plain-text files: one document per "file" or per blank-line "paragraph" block.
        val_fraction: Fraction of documents held out for validation (0 for none).
        workers: Tokenizer processes; by default one per CPU core.
        seed: Changes which documents land in the validation split.
        shard_tokens: Maximum tokens per shard file.
        fim_rate: Share of training spans rewritten for fill-in-the-middle (Bavarian et al. 2022, see
            `lmforge.data.fim`), so the model can complete code at a cursor. By default 0.5 for a code corpus
            (written by `data clean --preset code`, or mostly source files by extension) when the tokenizer
            has FIM tokens, else 0. Validation documents always stay left-to-right.
        fim_spm_rate: Share of FIM examples in suffix-prefix-middle order; the rest are prefix-suffix-middle.
        fim_span_tokens: Documents longer than this are cut at line ends into spans of about this many tokens,
            each transformed on its own, so an example fits a training window (at most half the context).

    Returns:
        The packed dataset directory.
    """
    data, out = Path(data), Path(out)
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"val_fraction={val_fraction} must be in [0, 1)")
    if shard_tokens < 1:
        raise ConfigError(f"shard_tokens={shard_tokens} must be at least 1")
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise ConfigError(f"workers={workers} must be at least 1")
    _refuse_nonempty(out)
    tokenizer = Path(tokenizer)
    tok_dir = tokenizer.parent if tokenizer.is_file() else tokenizer
    tok = Tokenizer.load(tok_dir)
    if tok.eos_id is None:
        raise ConfigError(f"{tok_dir}: tokenizer has no end-of-text token to separate documents (eos_token)")
    dtype = "uint16" if tok.vocab_size <= 2**16 else "uint32"
    fim = _fim_settings(data, glob, tok, tok_dir, fim_rate, fim_spm_rate, fim_span_tokens)

    tmp = out.parent / f".{out.name}.packing-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        writers = {split: _ShardWriter(tmp, split, shard_tokens) for split in ("train", "val")}
        texts = iter_texts(data, text_field=text_field, glob=glob, text_unit=text_unit)
        fim_examples = _write_splits(texts, workers, (str(tok_dir), dtype, seed, val_fraction, fim), writers)
        counts = {split: w.documents for split, w in writers.items()}
        if counts["train"] + counts["val"] == 0:
            raise DataError(f"{data}: no documents found (every file is empty)")
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if (tok_dir / name).is_file():
                atomic_write_bytes(tmp / "tokenizer" / name, (tok_dir / name).read_bytes())
        atomic_write_json(
            tmp / "meta.json",
            {
                "format_version": FORMAT_VERSION,
                "dtype": dtype,
                "vocab_size": tok.vocab_size,
                "eos_id": tok.eos_id,
                "bos_id": tok.bos_id,
                "pad_id": tok.pad_id,
                "seed": seed,
                "val_fraction": val_fraction,
                "documents": counts,
                "tokens": {split: w.tokens for split, w in writers.items()},
                "shards": {split: w.shards for split, w in writers.items()},
                "source": str(data),
                "field": text_field,
                "glob": glob,
                "text_unit": text_unit,
                "tokenizer": "tokenizer",
                "tokenizer_hash": tok.fingerprint,
                "fim": None if fim is None else {
                    "rate": fim[0].rate, "spm_rate": fim[0].spm_rate, "span_tokens": fim[0].span_tokens,
                    "tokens": list(tok.fim.names) if tok.fim else None, "examples": fim_examples},
            },
        )
        _refuse_nonempty(out)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _fim_settings(data: Path, glob: str | None, tok: Tokenizer, tok_dir: Path, rate: float | None,
                  spm_rate: float, span_tokens: int) -> tuple[FimConfig, Sentinels] | None:
    """The FIM transform pack applies, or None: asked for, or by default for a code corpus (see `pack`)."""
    auto = rate is None
    cfg = FimConfig((0.5 if is_code_corpus(data, glob) else 0.0) if auto else rate, spm_rate, span_tokens)
    if cfg.rate == 0:
        return None
    if tok.fim is None:
        if auto:
            print(f"note: {data} is code, but {tok_dir} has no fill-in-the-middle tokens: packing without FIM "
                  "(train the tokenizer with `--fim true` to get them)", file=sys.stderr)
            return None
        raise ConfigError(f"fim_rate={cfg.rate}: {tok_dir} has no fill-in-the-middle tokens (<|fim_prefix|>, "
                          "<fim_prefix>, ...); train the tokenizer with `lmforge tokenizer train --fim true`")
    return cfg, Sentinels(tok.fim.prefix, tok.fim.suffix, tok.fim.middle, tok.eos_id)


def _write_splits(
    texts: Iterable[str], workers: int, init_args: tuple, writers: dict[str, _ShardWriter]
) -> int:
    """Route each document to its split, holding back the last one of each split for the fix-ups below;
    returns the number of FIM examples written."""
    val_fraction = init_args[3]
    held: dict[str, np.ndarray | None] = {"train": None, "val": None}
    documents = tokens = fim_examples = 0
    bar = Progress(None, "pack", unit="documents")
    for flat, lengths, is_val, fims in _encoded(
        _batches(texts), workers, init_args
    ):
        fim_examples += fims
        offsets = np.concatenate(([0], np.cumsum(lengths)))
        for i, val in enumerate(is_val):
            split = "val" if val else "train"
            if held[split] is not None:
                writers[split].add(held[split])
            held[split] = flat[offsets[i] : offsets[i + 1]]
        documents += len(lengths)
        tokens += len(flat)
        bar.update(documents, tokens=f"{tokens:,}", **{"tok/s": f"{tokens / bar.elapsed():,.0f}"})
    bar.close()
    # A tiny corpus must still train and validate: hashing alone may leave either split empty.
    if held["train"] is None and held["val"] is not None:
        held["train"], held["val"] = held["val"], None
    elif val_fraction > 0 and documents >= 2 and held["val"] is None and held["train"] is not None:
        held["val"], held["train"] = held["train"], None
    for split, tokens_ in held.items():
        if tokens_ is not None:
            writers[split].add(tokens_)
    for w in writers.values():
        w.close()
    return fim_examples


class PackedDataset:
    """One split of a packed directory as a single token stream, memory-mapped across its shards."""

    def __init__(self, path: Path, split: str = "train"):
        self.path, self.split = Path(path), split
        meta_file = self.path / "meta.json"
        if not meta_file.is_file():
            raise DataError(
                f"{meta_file}: missing; is {self.path} a directory written by `lmforge data pack`?"
            )
        try:
            self.meta: dict[str, Any] = json.loads(meta_file.read_text(encoding="utf-8"))
            dtype = np.dtype(self.meta["dtype"])
            all_shards = self.meta["shards"]
            self.vocab_size: int = int(self.meta["vocab_size"])
            self.eos_id: int | None = self.meta.get("eos_id")
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
            raise DataError(f"{meta_file}: malformed ({type(e).__name__}: {e})") from None
        if not isinstance(all_shards, dict) or split not in all_shards:
            found = sorted(all_shards) if isinstance(all_shards, dict) else []
            raise DataError(f"{self.path} ({split} split): no such split in meta.json (found: {found})")
        self._shards: list[np.ndarray] = []
        for name in all_shards[split]:
            file = self.path / name
            if not file.is_file():
                raise DataError(f"{file}: shard listed in meta.json is missing")
            size = file.stat().st_size
            if size % dtype.itemsize:
                raise DataError(f"{file}: {size} bytes is not a whole number of {dtype} tokens (truncated?)")
            if size:
                self._shards.append(np.memmap(file, dtype=dtype, mode="r"))
        sizes = [len(s) for s in self._shards]
        self._offsets = np.concatenate(([0], np.cumsum(sizes, dtype=np.int64))).tolist()
        self.num_tokens: int = self._offsets[-1]
        expected = self.meta.get("tokens", {}).get(split)
        if expected is not None and expected != self.num_tokens:
            raise DataError(
                f"{self.path} ({split} split): meta.json says {expected} tokens "
                f"but the shards hold {self.num_tokens}; was a shard truncated or replaced?"
            )
        if self.num_tokens == 0:
            raise DataError(
                f"{self.path} ({split} split): 0 tokens; pack more data or a nonzero --val-fraction"
            )

    def __len__(self) -> int:
        return self.num_tokens

    def window(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the stream, read across shard boundaries."""
        if start < 0 or length < 0 or start + length > self.num_tokens:
            raise IndexError(
                f"window [{start}, {start + length}) outside the {self.num_tokens}-token {self.split} split"
            )
        shard = bisect.bisect_right(self._offsets, start) - 1
        pieces = []
        while length > 0:
            local = start - self._offsets[shard]
            piece = self._shards[shard][local : local + length]
            pieces.append(piece)
            start += len(piece)
            length -= len(piece)
            shard += 1
        return np.concatenate(pieces) if pieces else np.empty(0, dtype=self._shards[0].dtype)
