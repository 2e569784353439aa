"""The index directory: BM25 through bm25s, dense vectors from a given embedder, reciprocal-rank fusion, and
incremental re-indexing that re-embeds only what changed."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from lmforge.data.index import (
    CHUNKS,
    EMBEDDINGS,
    MANIFEST,
    DocumentIndex,
    build_index,
    cited_sources,
    quote_chunks,
    reciprocal_rank_fusion,
)
from lmforge.errors import ConfigError

DOCS = {
    "files.md": "Open a file for appending with mode 'a'.\n\nWriting then adds text at the end.",
    "math.md": "The square root of a number is computed by math.sqrt.\n\nIt returns a float.",
    "heap.md": "A heap keeps its smallest element first.\n\nheapq.heappush adds an item to the heap.",
}


class BagOfWords:
    """A deterministic stand-in encoder: hashed word counts, unit length; counts the texts it embeds."""

    def __init__(self, dim: int = 64) -> None:
        self.dim, self.seen = dim, []

    def __call__(self, texts: list[str]) -> torch.Tensor:
        self.seen += texts
        out = torch.zeros(len(texts), self.dim)
        for i, text in enumerate(texts):
            for word in text.lower().replace(".", " ").split():
                out[i, zlib.crc32(word.encode()) % self.dim] += 1
        return F.normalize(out, dim=-1)


def write_docs(root: Path, docs: dict[str, str] = DOCS) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, text in docs.items():
        (root / name).write_text(text)
    return root


ENCODER = {"path": "bag-of-words", "sha256": "a" * 64}


def test_index_directory_holds_chunks_bm25_vectors_and_manifest(tmp_path) -> None:
    embed = BagOfWords()
    info = build_index(write_docs(tmp_path / "docs"), tmp_path / "idx", embed=embed, encoder=ENCODER, max_chars=200,
                       overlap=0)
    assert info["files"] == 3 and info["changed"] == 3 and info["chunks"] == 3
    rows = [json.loads(line) for line in (tmp_path / "idx" / CHUNKS).read_text().splitlines()]
    assert {r["id"] for r in rows} == {"files.md#0", "math.md#0", "heap.md#0"}
    vectors = load_file(str(tmp_path / "idx" / EMBEDDINGS))["embeddings"]
    assert vectors.shape == (3, 64) and torch.allclose(vectors, embed([r["text"] for r in rows]))
    manifest = json.loads((tmp_path / "idx" / MANIFEST).read_text())
    assert manifest["encoder"]["sha256"] == ENCODER["sha256"] and set(manifest["files"]) == set(DOCS)


def test_bm25_ranks_by_stemmed_words_as_bm25s_does(tmp_path) -> None:
    import bm25s

    build_index(write_docs(tmp_path / "docs"), tmp_path / "idx", embed=None, encoder=None)
    index = DocumentIndex(tmp_path / "idx")
    hits = index.search("appending to a file", k=2, mode="bm25")
    assert hits[0].chunk.source == "files.md"  # "appending" finds "appending" and "file" finds "file"
    reference = bm25s.BM25()
    texts = [c.text for c in index.chunks]
    import Stemmer

    stemmer = Stemmer.Stemmer("english")
    reference.index(bm25s.tokenize(texts, stopwords="en", stemmer=stemmer, show_progress=False), show_progress=False)
    ids, scores = reference.retrieve(bm25s.tokenize(["appending to a file"], stopwords="en", stemmer=stemmer,
                                                    show_progress=False), k=1, show_progress=False)
    assert texts[int(ids[0][0])] == hits[0].chunk.text
    assert hits[0].score == pytest.approx(float(scores[0][0]))


def test_dense_ranks_by_cosine_and_hybrid_fuses_by_reciprocal_rank(tmp_path) -> None:
    embed = BagOfWords()
    build_index(write_docs(tmp_path / "docs"), tmp_path / "idx", embed=embed, encoder=ENCODER)
    index = DocumentIndex(tmp_path / "idx", embed=embed)
    dense = index.search("smallest element heap", k=3, mode="dense")
    query = embed(["smallest element heap"])[0]
    cosines = {c.id: float(index.embeddings[i] @ query) for i, c in enumerate(index.chunks)}
    assert [h.chunk.id for h in dense] == sorted(cosines, key=lambda c: -cosines[c])
    hybrid = index.search("smallest element heap", k=3, mode="hybrid")
    assert index.default_mode() == "hybrid" and hybrid[0].chunk.source == "heap.md"
    bm25 = index.bm25_ranking("smallest element heap", 100)
    expected = reciprocal_rank_fusion([bm25, index.dense_ranking("smallest element heap", 100)])
    assert [h.chunk.id for h in hybrid] == [index.chunks[i].id for i, _ in expected[:3]]


def test_reciprocal_rank_fusion_sums_one_over_sixty_plus_rank() -> None:
    fused = dict(reciprocal_rank_fusion([[(7, 9.0), (3, 1.0)], [(3, 0.9), (5, 0.1)]]))
    assert fused[3] == pytest.approx(1 / 62 + 1 / 61)
    assert fused[7] == pytest.approx(1 / 61) and fused[5] == pytest.approx(1 / 62)


def test_reindexing_re_embeds_only_changed_files_and_drops_removed_ones(tmp_path) -> None:
    docs = write_docs(tmp_path / "docs")
    build_index(docs, tmp_path / "idx", embed=BagOfWords(), encoder=ENCODER)
    (docs / "math.md").write_text("The cube root is math.cbrt.")
    (docs / "heap.md").unlink()
    embed = BagOfWords()
    info = build_index(docs, tmp_path / "idx", embed=embed, encoder=ENCODER)
    assert (info["changed"], info["unchanged"], info["removed"]) == (1, 1, 1)
    assert embed.seen == ["The cube root is math.cbrt."]
    index = DocumentIndex(tmp_path / "idx", embed=embed)
    assert {c.source for c in index.chunks} == {"files.md", "math.md"}
    assert index.search("cube root", k=1, mode="bm25")[0].chunk.source == "math.md"
    assert torch.allclose(index.embeddings, BagOfWords()([c.text for c in index.chunks]))


def test_an_index_inside_its_docs_folder_is_not_indexed(tmp_path) -> None:
    """`lmforge index docs/ --out docs/idx` twice: the second run does not read the index's own files as
    documents (its BM25 JSON once stopped it as "invalid JSON")."""
    docs = write_docs(tmp_path / "docs")
    first = build_index(docs, docs / "idx", embed=BagOfWords(), encoder=ENCODER)
    again = build_index(docs, docs / "idx", embed=BagOfWords(), encoder=ENCODER)
    assert (again["changed"], again["unchanged"]) == (0, first["changed"])
    assert {c.source for c in DocumentIndex(docs / "idx").chunks} == set(DOCS)


def test_a_new_encoder_re_embeds_everything(tmp_path) -> None:
    docs = write_docs(tmp_path / "docs")
    build_index(docs, tmp_path / "idx", embed=BagOfWords(), encoder=ENCODER)
    embed = BagOfWords()
    build_index(docs, tmp_path / "idx", embed=embed, encoder={"path": "other", "sha256": "b" * 64})
    assert len(embed.seen) == 3


def test_dense_search_without_vectors_says_what_to_do(tmp_path) -> None:
    build_index(write_docs(tmp_path / "docs"), tmp_path / "idx", embed=None, encoder=None)
    index = DocumentIndex(tmp_path / "idx")
    assert index.default_mode() == "bm25"
    with pytest.raises(ConfigError, match="--embed"):
        index.search("heap", mode="dense")


def test_quoted_prompt_numbers_chunks_and_citations_are_read_back(tmp_path) -> None:
    build_index(write_docs(tmp_path / "docs"), tmp_path / "idx", embed=None, encoder=None)
    hits = DocumentIndex(tmp_path / "idx").search("heap file", k=2, mode="bm25")
    messages = quote_chunks("What is a heap?", hits)
    assert f"[1] {hits[0].chunk.id}\n{hits[0].chunk.text}" in messages[-1]["content"]
    sources = cited_sources("It keeps the smallest first [2].", hits)
    assert [(s["n"], s["cited"]) for s in sources] == [(2, True), (1, False)]
