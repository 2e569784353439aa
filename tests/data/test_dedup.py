"""Deduplication: exact, MinHash near duplicates (planted, recall/precision measured), boilerplate lines."""

from __future__ import annotations

import json
import random
from pathlib import Path

from lmforge.data import dedup, exact_dedup, near_dedup
from lmforge.data.dedup import exact_key, shingles
from lmforge.data.readers import read_shard

_VOCAB = [f"w{i}" for i in range(3000)]


def _doc(rng: random.Random) -> str:
    sentences = [" ".join(rng.choices(_VOCAB, k=rng.randint(8, 16))) + "." for _ in range(rng.randint(20, 30))]
    return " ".join(sentences)


def _near_copy(text: str, rng: random.Random) -> str:
    """A small edit: a few words substituted or dropped, or two sentences swapped."""
    if rng.random() < 0.5:
        sentences = text.split(". ")
        i, j = rng.sample(range(len(sentences) - 1), 2)
        sentences[i], sentences[j] = sentences[j], sentences[i]
        return ". ".join(sentences)
    words = text.split()
    for _ in range(rng.randint(1, 3)):
        k = rng.randrange(len(words))
        if rng.random() < 0.5:
            words[k] = rng.choice(_VOCAB)
        else:
            del words[k]
    return " ".join(words)


def test_exact_key_folds_case_and_whitespace():
    assert exact_key("Hello  World\n") == exact_key("hello world")
    assert exact_key("hello world") != exact_key("hello worlds")


def test_exact_dedup_keeps_the_first_copy_and_reports_it():
    removed: list[tuple[str, str]] = []
    docs = [{"id": "a", "text": "x y"}, {"id": "b", "text": "X  Y"}, {"id": "c", "text": "z"}]
    assert [d["id"] for d in exact_dedup(docs, removed)] == ["a", "c"]
    assert removed == [("b", "a")]


def test_chinese_text_shingles_by_character():
    assert len(shingles("我们今天去公园散步了", n=5)) == 6


def test_planted_near_duplicates_are_found_with_high_recall_and_precision():
    """300 distinct documents + 100 near copies (edits, reorderings): recall ≥ 0.9, precision ≥ 0.95."""
    rng = random.Random(0)
    originals = [{"id": f"o{i}", "text": _doc(rng)} for i in range(300)]
    copies = [{"id": f"c{i}", "text": _near_copy(originals[i]["text"], rng)} for i in range(100)]
    corpus = originals + copies
    rng.shuffle(corpus)
    removed: list[tuple[str, str]] = []
    list(near_dedup(corpus, 0.8, removed=removed))
    found = {r for r, _ in removed}
    # Either member of a planted pair may come first in the shuffled order; the later one is the duplicate.
    order = {d["id"]: k for k, d in enumerate(corpus)}
    later = {max((f"o{i}", f"c{i}"), key=order.__getitem__) for i in range(100)}
    recall = len(found & later) / len(later)
    precision = len(found & later) / max(len(found), 1)
    assert recall >= 0.9 and precision >= 0.95, (recall, precision)


def test_dedup_verb_removes_exact_and_near_copies_across_shards_and_reports_clusters(tmp_path):
    rng = random.Random(1)
    base = [_doc(rng) for _ in range(20)]
    (tmp_path / "in").mkdir()
    with open(tmp_path / "in" / "a.jsonl", "w") as f:
        for i, t in enumerate(base[:10]):
            f.write(json.dumps({"id": f"a{i}", "text": t}) + "\n")
    with open(tmp_path / "in" / "b.jsonl", "w") as f:
        for i, t in enumerate(base[10:]):
            f.write(json.dumps({"id": f"b{i}", "text": t}) + "\n")
        f.write(json.dumps({"id": "exact", "text": base[0].upper()}) + "\n")
        f.write(json.dumps({"id": "near", "text": _near_copy(base[3], rng)}) + "\n")
    res = dedup(tmp_path / "in", tmp_path / "out", progress=False)
    assert res["documents"] == 22 and res["kept"] == 20
    assert res["removed"] == {"exact_duplicate": 1, "near_duplicate": 1}
    clusters = [json.loads(line) for line in (tmp_path / "out" / "clusters.jsonl").read_text().splitlines()]
    assert {c["kept"]: c["removed"] for c in clusters} == {"a0": ["exact"], "a3": ["near"]}
    kept = [r["id"] for p in sorted((tmp_path / "out").glob("part-*")) for r in read_shard(p)]
    assert "exact" not in kept and "near" not in kept and len(kept) == 20


def test_boilerplate_lines_shared_by_many_documents_are_removed(tmp_path):
    rng = random.Random(2)
    footer = "Copyright 2024 Example Corp. All rights reserved."
    rows = [{"id": str(i), "text": f"{_doc(rng)}\n{footer}"} for i in range(5)] + [{"id": "only", "text": footer}]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = dedup(src, tmp_path / "out", near_threshold=None, boilerplate="line", boilerplate_min_docs=3,
                progress=False)
    assert res["removed"] == {"boilerplate": 1}  # the document that was nothing but the footer
    texts = [r["text"] for r in read_shard(Path(tmp_path / "out" / "part-00000.jsonl"))]
    assert len(texts) == 5 and not any(footer in t for t in texts)
