"""Chunking: whole paragraphs and code blocks per chunk, overlap carried from the chunk before, and only a
block too long on its own is split (a paragraph at sentence ends, code at line ends, each piece fenced)."""

from __future__ import annotations

import itertools

import pytest

from lmforge.data.chunk import blocks, chunk_document, chunk_text
from lmforge.errors import ConfigError

CODE = "```python\ndef f(x):\n\n    return x + 1\n```"  # a blank line inside: still one block


def test_blocks_keep_a_fenced_code_block_whole_across_blank_lines() -> None:
    text = f"First paragraph\nstill first.\n\n{CODE}\n\nLast one."
    assert blocks(text) == ["First paragraph\nstill first.", CODE, "Last one."]


def test_chunks_hold_whole_blocks_and_never_cut_a_code_block() -> None:
    paragraphs = [f"Paragraph {i} says something about topic {i}." for i in range(12)]
    text = "\n\n".join([*paragraphs[:6], CODE, *paragraphs[6:]])
    chunks = chunk_text(text, max_chars=160, overlap=60)
    assert len(chunks) > 3
    for chunk in chunks:
        assert len(chunk) <= 160
        for block in chunk.replace(CODE, "CODE").split("\n\n"):
            assert block in paragraphs or block == "CODE"
    assert sum(CODE in c for c in chunks) >= 1  # the code block sits whole in some chunk
    covered = "\n\n".join(chunks)
    assert all(p in covered for p in paragraphs)


def test_each_chunk_starts_with_the_tail_of_the_one_before() -> None:
    paragraphs = [f"Sentence number {i} is here." for i in range(20)]
    chunks = chunk_text("\n\n".join(paragraphs), max_chars=120, overlap=40)
    for before, after in itertools.pairwise(chunks):
        assert after.split("\n\n")[0] == before.split("\n\n")[-1]


def test_no_overlap_means_each_block_once() -> None:
    paragraphs = [f"Sentence number {i} is here." for i in range(20)]
    chunks = chunk_text("\n\n".join(paragraphs), max_chars=120, overlap=0)
    assert [b for c in chunks for b in c.split("\n\n")] == paragraphs


def test_a_long_paragraph_splits_at_sentence_ends_and_long_code_at_lines_each_fenced() -> None:
    paragraph = " ".join(f"This is sentence {i} of a long paragraph." for i in range(10))
    parts = chunk_text(paragraph, max_chars=100, overlap=0)
    assert all(len(p) <= 100 and p.endswith(".") for p in parts)
    assert " ".join(parts) == paragraph
    code = "```\n" + "\n".join(f"line_{i} = {i}" for i in range(30)) + "\n```"
    pieces = chunk_text(code, max_chars=80, overlap=0)
    assert len(pieces) > 2 and all(p.startswith("```\n") and p.endswith("\n```") for p in pieces)
    assert [ln for p in pieces for ln in p.splitlines()[1:-1]] == code.splitlines()[1:-1]


def test_chunk_ids_name_source_and_position() -> None:
    chunks = chunk_document("guide.md", "One.\n\nTwo.", max_chars=50, overlap=0)
    assert [(c.id, c.source, c.index) for c in chunks] == [("guide.md#0", "guide.md", 0)]


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ConfigError, match="overlap"):
        chunk_text("x", max_chars=100, overlap=100)
    with pytest.raises(ConfigError, match="max_chars"):
        chunk_text("x", max_chars=10)
