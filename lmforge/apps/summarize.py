"""`lmforge summarize`: a short summary of each document, by an encoder-decoder or a prompted decoder.

An encoder-decoder trained on (text, summary) pairs (`pretrain --task seq2seq` on summarization pairs, or an
imported T5) summarizes as it translates. A decoder-only model (an instruction-tuned chat model, imported or
fine-tuned here) is asked to, through its chat template when it has one (`LM.summarize`). Documents come
from the one corpus reader: a text file is one document, a JSONL file one per row, a folder one per file.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lmforge.apps.translate import model_of, refuse_missing_path, write_lines
from lmforge.data.readers import file_format, iter_texts, read_rows
from lmforge.errors import DataError
from lmforge.io import check_output
from lmforge.progress import Progress


def documents(input: str, field: str = "text") -> list[str]:
    """The documents of a file or folder, or `input` itself as the one document when it names no file. A rows
    file (JSONL, CSV, Parquet) gives one document per row, an empty one included, so output line k is row k's
    summary; a text file is one document; a folder one per file (`iter_texts`)."""
    try:
        exists = len(input) < 4096 and Path(input).exists()
    except OSError:
        exists = False
    if not exists:
        refuse_missing_path(input)
        return [input]
    path = Path(input)
    if path.is_file() and file_format(path) != "text":
        texts = []
        for line, row in read_rows(path):
            if field not in row:
                raise DataError(f"{path}:{line}: no field {field!r} (fields: {sorted(row)}); choose --text-field")
            texts.append(str(row[field] or ""))
        return texts
    return list(iter_texts(path, text_field=field))


def summarize(
    model: str,
    input: str,
    *,
    out: Path | None = None,
    text_field: str = "text",
    max_new_tokens: int | None = None,
    num_beams: int | None = None,
    batch_size: int = 8,
    device: str | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> str | None:
    """Summarize a document (a text file, or the text itself) or each document of a JSONL file or folder.

    Args:
        model: An encoder-decoder trained on (text, summary) pairs, or a decoder-only (best an instruction-tuned
            chat) model, which is prompted; a checkpoint or Hugging Face folder; from Python also a loaded `LM`.
        input: A text file (one document), a JSONL file (one document per row, in `field`), a folder, or the text.
        out: Write one summary per line here; default: print them.
        text_field: The JSONL field holding each document.
        max_new_tokens: Most tokens per summary (default: the encoder-decoder's generation_config, 128 for a
            decoder).
        num_beams: Beam width for an encoder-decoder (default: its generation_config); a decoder decodes greedily.
        batch_size: Documents decoded together by an encoder-decoder.
        device: cpu or cuda; default cuda when available.
        progress: Show progress on stderr.
        overwrite: Replace a non-empty file at `out` (refused by default, as in every verb).

    Returns:
        The summaries as text when `out` is not given.
    """
    if out is not None:
        check_output(out, overwrite)
    texts = documents(str(input), text_field)
    lm = model_of(model, device)
    summaries: list[str] = []
    bar = Progress(len(texts), "summarize", unit="docs", enabled=progress and len(texts) > 1)
    for start in range(0, len(texts), batch_size):
        options = {"num_beams": num_beams} if num_beams is not None and lm.is_seq2seq else {}
        batch = texts[start:start + batch_size]
        real = [t for t in batch if t.strip()]  # an empty row gets an empty summary, not a guess
        done = iter(lm.summarize(real, max_new_tokens=max_new_tokens, **options) if real else [])
        summaries += [next(done) if t.strip() else "" for t in batch]
        bar.update(len(summaries))
    if out is None:
        return "\n".join(summaries)
    write_lines(Path(out), summaries)
    print(f"summarized {len(summaries)} documents into {out}", file=sys.stderr)
    return None
