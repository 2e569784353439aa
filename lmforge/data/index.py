"""A retrieval index of documents: chunks, BM25, dense vectors and their fusion, in one directory.

```
idx/
  manifest.json           format, the chunking settings, each file's content hash, the encoder and its hash
  chunks.jsonl            one chunk a line: id (file#n), source, index, text, file
  bm25/                   the BM25 state (bm25s: sparse term-score matrix and vocabulary)
  embeddings.safetensors  "embeddings" [chunks, dim], unit vectors in chunks.jsonl order (absent: BM25 only)
```

Lexical retrieval is BM25 (Robertson & Zaragoza 2009) through bm25s, with English stopwords and the Snowball
stemmer, so "appending" finds "append". Dense retrieval is cosine similarity between unit vectors from an
encoder (mean-pooled MiniLM by default, as sentence-transformers pools it). Hybrid fuses the two rankings by
reciprocal rank, score = Σ 1 / (60 + rank) (Cormack et al. 2009): ranks, not scores, so the two scales never
need calibrating. Re-indexing re-chunks and re-embeds only files whose content hash changed (all of them if
the encoder or the chunking settings did); BM25 is rebuilt whole, which takes milliseconds at this scale.

This module knows the format and the search; embedding texts is a function passed in (an `LM.embed`), so
it sits below the model-loading layers and the server, the applications and evaluation all share it.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file

from lmforge.data.chunk import Chunk, chunk_document
from lmforge.data.readers import input_files, read_file
from lmforge.errors import ConfigError, DataError
from lmforge.io import atomic_path, atomic_write_json

FORMAT = "lmforge-index/1"
MANIFEST, CHUNKS, EMBEDDINGS, BM25_DIR = "manifest.json", "chunks.jsonl", "embeddings.safetensors", "bm25"
RRF_K = 60  # Cormack et al. 2009: the constant that damps the weight of top ranks
FUSION_DEPTH = 100  # each ranking contributes its top this-many to the fusion
Mode = Literal["bm25", "dense", "hybrid"]
Embed = Callable[[list[str]], torch.Tensor]  # texts -> [N, dim] unit vectors
CITATION = re.compile(r"\[(\d+)\]")  # [1], [2]: how an answer cites the chunks `quote_chunks` numbered


@dataclass
class Hit:
    """A retrieved chunk, its 1-based rank and score (BM25, cosine, or fused reciprocal rank)."""

    rank: int
    score: float
    chunk: Chunk

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "score": self.score, **self.chunk.to_dict()}


def directory_sha256(path: Path) -> str:
    """Hash of a model directory's config and weights: what decides the vectors an encoder gives."""
    path = Path(path)
    files = sorted([*path.glob("*.safetensors"), *path.glob("config.json"), *path.glob("tokenizer.json")])
    if not files:
        raise ConfigError(f"{path}: no config.json or *.safetensors; not an encoder directory")
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as stream:
            while block := stream.read(1 << 20):
                h.update(block)
    return h.hexdigest()


def _stemmer() -> Any:
    import Stemmer  # PyStemmer: the Snowball stemmers bm25s recommends

    return Stemmer.Stemmer("english")


def bm25_tokens(texts: list[str]) -> list[list[str]]:
    import bm25s

    return bm25s.tokenize(texts, stopwords="en", stemmer=_stemmer(), return_ids=False, show_progress=False)


def read_manifest(path: Path) -> dict[str, Any]:
    file = Path(path) / MANIFEST
    if not file.is_file():
        raise ConfigError(f"{path}: no {MANIFEST}; not an index directory (build one with `lmforge index DOCS --out "
                          f"{path}`)")
    manifest = json.loads(file.read_text(encoding="utf-8"))
    if manifest.get("format") != FORMAT:
        raise ConfigError(f"{file}: format {manifest.get('format')!r}, expected {FORMAT!r}; rebuild the index")
    return manifest


def _read_chunks(path: Path) -> list[dict[str, Any]]:
    with open(Path(path) / CHUNKS, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def build_index(docs: Path, out: Path, *, embed: Embed | None, encoder: dict[str, Any] | None, glob: str | None = None,
                max_chars: int = 800, overlap: int = 200) -> dict[str, Any]:
    """Index (or re-index) every text file under `docs` into `out`; returns what changed.

    `encoder` describes `embed` for the manifest ({"path", "sha256"}); both None builds a BM25-only index.
    """
    docs, out = Path(docs), Path(out)
    chunking = {"max_chars": max_chars, "overlap": overlap, "glob": glob}
    old: dict[str, Any] | None = None
    if (out / MANIFEST).is_file():
        old = read_manifest(out)
    elif out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out}: exists and is not an index directory; choose another --out")
    reuse_text = old is not None and old["chunking"] == chunking
    reuse_vectors = reuse_text and (old["encoder"] or {}).get("sha256") == (encoder or {}).get("sha256") \
        and encoder is not None
    old_chunks = _read_chunks(out) if reuse_text else []
    old_vectors = load_file(str(out / EMBEDDINGS))["embeddings"] if reuse_vectors else None
    by_file: dict[str, list[int]] = {}
    for i, row in enumerate(old_chunks):
        by_file.setdefault(row["file"], []).append(i)

    files: dict[str, str] = {}
    rows: list[dict[str, Any]] = []
    vectors: list[torch.Tensor | None] = []
    changed: list[str] = []
    inside = Path(out).resolve()
    for path, name in input_files(docs, glob, text_only=True):
        if path.resolve().is_relative_to(inside):  # an index kept in its own docs folder is not a document
            continue
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        files[name] = digest
        if reuse_text and old["files"].get(name) == digest:
            for i in by_file.get(name, []):
                rows.append(old_chunks[i])
                vectors.append(old_vectors[i] if old_vectors is not None else None)
            continue
        changed.append(name)
        for record in read_file(path, name, on_error="raise"):
            if not isinstance(record, dict):  # an empty or unreadable document: nothing to retrieve
                continue
            for chunk in chunk_document(str(record["id"]), record["text"], max_chars=max_chars, overlap=overlap):
                rows.append({**chunk.to_dict(), "file": name})
                vectors.append(None)
    if not rows:
        raise DataError(f"{docs}: no text to index")
    todo = [i for i, v in enumerate(vectors) if v is None]
    if embed is not None and todo:
        fresh = embed([rows[i]["text"] for i in todo]).float().cpu()
        for i, v in zip(todo, fresh):
            vectors[i] = v

    import bm25s

    retriever = bm25s.BM25()
    retriever.index(bm25_tokens([r["text"] for r in rows]), show_progress=False)
    out.mkdir(parents=True, exist_ok=True)
    staging = out / (BM25_DIR + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    retriever.save(str(staging))
    with atomic_path(out / CHUNKS) as tmp:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    if embed is not None:
        with atomic_path(out / EMBEDDINGS) as tmp:
            save_file({"embeddings": torch.stack(vectors).contiguous()}, str(tmp))
    else:
        (out / EMBEDDINGS).unlink(missing_ok=True)
    shutil.rmtree(out / BM25_DIR, ignore_errors=True)
    staging.rename(out / BM25_DIR)
    removed = sorted(set(old["files"]) - set(files)) if old else []
    atomic_write_json(out / MANIFEST, {"format": FORMAT, "docs": str(docs.resolve()), "chunking": chunking,
                                       "files": files, "chunks": len(rows), "encoder": encoder,
                                       "bm25": {"library": "bm25s", "stopwords": "en", "stemmer": "snowball-english"}})
    return {"out": str(out), "files": len(files), "changed": len(changed), "unchanged": len(files) - len(changed),
            "removed": len(removed), "chunks": len(rows), "embedded": len(todo) if embed is not None else 0,
            "encoder": (encoder or {}).get("path")}


class DocumentIndex:
    """An index directory opened for search; dense and hybrid search need `embed` (the manifest's encoder)."""

    def __init__(self, path: Path, embed: Embed | None = None) -> None:
        import bm25s

        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.chunks = [Chunk(r["id"], r["source"], r["index"], r["text"]) for r in _read_chunks(self.path)]
        self.bm25 = bm25s.BM25.load(str(self.path / BM25_DIR))
        file = self.path / EMBEDDINGS
        self.embeddings = load_file(str(file))["embeddings"] if file.is_file() else None
        self.embed = embed

    @property
    def encoder(self) -> dict[str, Any] | None:
        return self.manifest.get("encoder")

    def check_encoder(self, directory: Path) -> None:
        """Refuse an encoder other than the one that made the stored vectors: its scores would be noise."""
        if self.encoder and directory_sha256(directory) != self.encoder["sha256"]:
            raise ConfigError(f"{self.path}: was embedded with the encoder {self.encoder['path']} (sha256 "
                              f"{self.encoder['sha256'][:12]}…), but {directory} differs; re-run `lmforge index` "
                              "with it, or pass the original")

    def default_mode(self) -> Mode:
        return "hybrid" if self.embeddings is not None else "bm25"

    def bm25_ranking(self, query: str, depth: int) -> list[tuple[int, float]]:
        tokens = bm25_tokens([query])
        if not tokens[0]:
            return []
        ids, scores = self.bm25.retrieve(tokens, k=min(depth, len(self.chunks)), show_progress=False)
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if s > 0]

    def dense_ranking(self, query: str, depth: int) -> list[tuple[int, float]]:
        if self.embeddings is None:
            raise ConfigError(f"{self.path}: has no embeddings (built BM25-only); use mode 'bm25' or re-index with "
                              "--embed")
        if self.embed is None:
            raise ConfigError("dense retrieval needs the index's encoder to embed the query")
        query_vector = self.embed([query]).float().cpu()[0]
        scores = self.embeddings @ query_vector
        top = torch.topk(scores, min(depth, len(self.chunks)))
        return [(int(i), float(s)) for i, s in zip(top.indices, top.values)]

    def search(self, query: str, k: int = 5, mode: Mode | None = None) -> list[Hit]:
        """The `k` best chunks for `query`, best first."""
        mode = mode or self.default_mode()
        if k < 1:
            raise ConfigError(f"k={k}: ask for at least one chunk")
        if mode == "bm25":
            ranking = self.bm25_ranking(query, k)
        elif mode == "dense":
            ranking = self.dense_ranking(query, k)
        elif mode == "hybrid":
            ranking = reciprocal_rank_fusion([self.bm25_ranking(query, FUSION_DEPTH),
                                              self.dense_ranking(query, FUSION_DEPTH)])[:k]
        else:
            raise ConfigError(f"mode={mode!r}: expected one of bm25, dense, hybrid")
        return [Hit(rank, score, self.chunks[i]) for rank, (i, score) in enumerate(ranking[:k], 1)]


def reciprocal_rank_fusion(rankings: list[list[tuple[int, float]]], k: int = RRF_K) -> list[tuple[int, float]]:
    """Items of several rankings by Σ 1/(k + rank) (ranks from 1), best first; ties keep first-seen order."""
    fused: dict[int, float] = {}
    for ranking in rankings:
        for rank, (item, _) in enumerate(ranking, 1):
            fused[item] = fused.get(item, 0.0) + 1.0 / (k + rank)
    return sorted(fused.items(), key=lambda kv: -kv[1])


def quote_chunks(question: str, hits: list[Hit]) -> list[dict[str, str]]:
    """Chat messages asking for an answer from the retrieved chunks alone, each quoted under its number and id
    ([1] file.md#0) so the answer can cite it: the prompt every generative answer uses (CLI, server, eval)."""
    sources = "\n\n".join(f"[{n}] {h.chunk.id}\n{h.chunk.text}" for n, h in enumerate(hits, 1))
    return [{"role": "system", "content": "Answer the question using only the numbered sources. Cite the sources "
                                          "you use as [1], [2], ... If they do not contain the answer, say so."},
            {"role": "user", "content": f"Sources:\n\n{sources}\n\nQuestion: {question}"}]


def cited_sources(text: str, hits: list[Hit]) -> list[dict[str, Any]]:
    """The quoted chunks (number, id, file, score), each marked cited if `text` names its number; cited first."""
    cited = {int(n) for n in CITATION.findall(text)}
    sources = [{"n": n, "id": h.chunk.id, "source": h.chunk.source, "score": h.score, "cited": n in cited}
               for n, h in enumerate(hits, 1)]
    return sorted(sources, key=lambda s: not s["cited"]) if cited else sources
