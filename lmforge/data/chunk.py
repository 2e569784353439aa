"""Split documents into overlapping chunks for retrieval, never cutting a paragraph or a code block needlessly.

A document is first cut into blocks: paragraphs (separated by blank lines) and fenced code blocks (```` ``` ````
or `~~~` up to the matching fence, blank lines inside included). Chunks are runs of whole blocks up to
`max_chars`; each chunk after the first starts with the last blocks of the one before, up to `overlap`
characters, so a sentence near a boundary is found with its context on either side. Only a block longer than
`max_chars` on its own is split: a paragraph at sentence ends (else at spaces), a code block at line ends,
each piece of code wrapped in its fence again so it stays a code block.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from lmforge.errors import ConfigError

FENCE = re.compile(r"^ {0,3}(```+|~~~+)")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass
class Chunk:
    """One retrievable piece of a document; `id` is `source#index`, as answers cite it."""

    id: str
    source: str
    index: int
    text: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def blocks(text: str) -> list[str]:
    """Paragraphs and fenced code blocks, in order; a fence left open runs to the end of the text."""
    out: list[str] = []
    current: list[str] = []
    fence: str | None = None
    for line in text.splitlines():
        match = FENCE.match(line)
        if fence is not None:
            current.append(line)
            if match and match.group(1)[0] == fence[0] and len(match.group(1)) >= len(fence) \
                    and not line.strip()[len(match.group(1)):].strip():
                out.append("\n".join(current))
                current, fence = [], None
            continue
        if match:
            if current:
                out.append("\n".join(current))
            current, fence = [line], match.group(1)
        elif line.strip():
            current.append(line)
        elif current:
            out.append("\n".join(current))
            current = []
    if current:
        out.append("\n".join(current))
    return out


def _split_long(block: str, max_chars: int) -> list[str]:
    """A block longer than `max_chars` in pieces of at most `max_chars` (a single longer word or line excepted)."""
    match = FENCE.match(block)
    if match:
        lines = block.splitlines()
        opening = lines[0]
        closing = lines[-1] if len(lines) > 1 and FENCE.match(lines[-1]) else match.group(1)
        body = lines[1:-1] if closing == lines[-1] and len(lines) > 1 else lines[1:]
        room = max(1, max_chars - len(opening) - len(closing) - 2)
        return [f"{opening}\n{piece}\n{closing}" for piece in _pack(body, room, "\n")]
    sentences = SENTENCE_END.split(block)
    if max(map(len, sentences)) > max_chars:  # sentences too long on their own: fall back to words
        sentences = block.split()
    return _pack(sentences, max_chars, " ")


def _pack(parts: list[str], max_chars: int, joiner: str) -> list[str]:
    out: list[str] = []
    current: list[str] = []
    size = 0
    for part in parts:
        if current and size + len(joiner) + len(part) > max_chars:
            out.append(joiner.join(current))
            current, size = [], 0
        size += (len(joiner) if current else 0) + len(part)
        current.append(part)
    if current:
        out.append(joiner.join(current))
    return out


def chunk_text(text: str, *, max_chars: int = 800, overlap: int = 200) -> list[str]:
    """The chunk texts of one document (see the module docstring)."""
    if max_chars < 50:
        raise ConfigError(f"max_chars={max_chars}: chunks under 50 characters cannot hold a sentence")
    if not 0 <= overlap < max_chars:
        raise ConfigError(f"overlap={overlap}: must be at least 0 and less than max_chars={max_chars}")
    pieces = [p for b in blocks(text) for p in ([b] if len(b) <= max_chars else _split_long(b, max_chars))]
    chunks: list[list[str]] = []
    current: list[str] = []
    fresh = 0  # blocks of `current` not already in the chunk before
    for piece in pieces:
        size = sum(map(len, current)) + 2 * len(current)
        if current and size + len(piece) > max_chars and fresh:
            chunks.append(current)
            carried: list[str] = []
            for block in reversed(current):  # the previous chunk's tail, whole blocks, up to `overlap`
                kept = sum(map(len, carried)) + len(block)
                if kept > overlap or kept + len(piece) + 2 * (len(carried) + 1) > max_chars:
                    break
                carried.insert(0, block)
            current, fresh = carried, 0
        current.append(piece)
        fresh += 1
    if current and fresh:
        chunks.append(current)
    return ["\n\n".join(c) for c in chunks]


def chunk_document(source: str, text: str, *, max_chars: int = 800, overlap: int = 200) -> list[Chunk]:
    return [Chunk(f"{source}#{i}", source, i, t)
            for i, t in enumerate(chunk_text(text, max_chars=max_chars, overlap=overlap))]
