"""`lmforge translate`: an encoder-decoder's output for each line of a file (or for one text).

The model is any seq2seq checkpoint: trained here (`pretrain --task seq2seq`), imported (MarianMT, T5), or a
Hugging Face folder read directly. Decoding is `LM.translate` (infer/seq2seq.py: the encoder once per source,
beam search or greedy); this verb only reads the input, batches it and writes one line per source.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any, Literal

from lmforge.errors import DataError
from lmforge.io import atomic_path, check_output
from lmforge.lm import LM, load
from lmforge.progress import Progress

EarlyStopping = Literal["false", "true", "never"]


def looks_like_a_path(input: str) -> bool:
    """An input with no spaces that has a folder separator or a file extension (held_out.en, docs/a.txt): a
    file name, so a missing one is an error rather than a text to translate."""
    return bool(input) and not any(c.isspace() for c in input) and (
        "/" in input or bool(re.fullmatch(r"\.[A-Za-z0-9]{1,8}", Path(input).suffix)))


def refuse_missing_path(input: str, option: str = "--input") -> None:
    if looks_like_a_path(input) and not Path(input).exists():
        raise DataError(f"{option} {input}: no such file (a text with spaces, or without a file extension, is "
                        "taken as the text itself)")


def read_sources(input: str | Path) -> tuple[list[str], bool]:
    """The sources in `input`: one per line of a file ("-" = stdin), else `input` itself is the one source.
    Also whether it was a file (a file gets one output line per input line, blank lines included)."""
    if str(input) == "-":
        return sys.stdin.read().splitlines(), True
    path = Path(input)
    try:
        is_file = len(str(input)) < 4096 and path.is_file()
    except OSError:  # a text too long for a path name
        is_file = False
    if not is_file:
        if len(str(input)) < 4096 and path.is_dir():
            raise DataError(f"--input {input}: a folder; translate reads one text file (one source per line)")
        refuse_missing_path(str(input))
        return [str(input)], False
    try:
        return path.read_text(encoding="utf-8").splitlines(), True
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}); translate reads one source per line") from None


def model_of(model: str | Path | LM, device: str | None = None) -> LM:
    return model if isinstance(model, LM) else load(model, device=device)


def write_lines(out: Path, lines: list[str]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        Path(tmp).write_text("".join(line.replace("\n", " ") + "\n" for line in lines), encoding="utf-8")


def translate(
    model: str,
    input: str,
    *,
    out: Path | None = None,
    num_beams: int | None = None,
    max_new_tokens: int | None = None,
    length_penalty: float | None = None,
    early_stopping: EarlyStopping | None = None,
    num_return_sequences: int = 1,
    batch_size: int = 16,
    device: str | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> str | None:
    """Translate each line of a file (or one text) with an encoder-decoder model.

    Args:
        model: A seq2seq checkpoint directory (ours, or a Hugging Face MarianMT / T5 folder); from Python
            also a loaded `LM`.
        input: A text file with one source per line ("-" reads stdin), or the text to translate itself.
        out: Write one output line per input line here (blank lines stay blank); default: print them.
        num_beams: Beam width; 1 is greedy. Default: the checkpoint's generation_config.json.
        max_new_tokens: Most tokens per output. Default: the checkpoint's.
        length_penalty: Beams are ranked by log p / length**length_penalty (Wu et al. 2016).
        early_stopping: Beam search stops: "false" when no running beam can beat the finished ones at its
            current length (transformers' default), "true" once num_beams have finished, "never" exhaustive.
        num_return_sequences: n-best: with n > 1 each source gives n lines "i ||| output" (Moses n-best format).
        batch_size: Sources decoded together.
        device: cpu or cuda; default cuda when available.
        progress: Show progress on stderr.
        overwrite: Replace a non-empty file at `out` (refused by default, as in every verb).

    Returns:
        The outputs as text when `out` is not given.
    """
    if out is not None:
        check_output(out, overwrite)
    sources, _ = read_sources(input)
    lm = model_of(model, device)
    stopping: Any = {"false": False, "true": True, "never": "never"}.get(str(early_stopping).lower(), early_stopping)
    real = [i for i, s in enumerate(sources) if s.strip()]
    outputs: list[Any] = ["" if num_return_sequences == 1 else [] for _ in sources]
    bar = Progress(len(real), "translate", unit="lines", enabled=progress and len(real) > batch_size)
    for start in range(0, len(real), batch_size):
        chunk = real[start:start + batch_size]
        results = lm.translate([sources[i] for i in chunk], num_beams=num_beams, max_new_tokens=max_new_tokens,
                               length_penalty=length_penalty, early_stopping=stopping,
                               num_return_sequences=num_return_sequences, batch_size=batch_size)
        for i, result in zip(chunk, results):
            outputs[i] = result
        bar.update(start + len(chunk))
    lines = outputs if num_return_sequences == 1 else [
        f"{i} ||| {hyp}" for i, n_best in enumerate(outputs) for hyp in n_best]
    if out is None:
        return "\n".join(lines)
    write_lines(Path(out), lines)
    print(f"translated {len(real)} lines into {out}", file=sys.stderr)
    return None
