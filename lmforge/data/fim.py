"""Fill-in-the-middle (FIM) training data: Bavarian et al. 2022, "Efficient Training of Language Models to Fill
in the Middle".

A document (or a span of one, below) is cut at two character positions drawn uniformly into prefix, middle and
suffix, and moved so the middle comes last:

    PSM   <PRE> prefix <SUF> suffix <MID> middle <EOT>
    SPM   <PRE> <SUF> suffix <MID> prefix middle <EOT>      (the paper's SPM variant 2, as StarCoder trains)

so an ordinary left-to-right model learns to write a middle given both sides; the paper finds a FIM rate of 0.5
costs no left-to-right ability. Each piece is tokenized on its own and the sentinels are inserted as ids.

Pack does not know the training window, so long documents are first cut at line starts into spans of about
`span_tokens` tokens and each span is transformed (or not) on its own and ends with eos when it is: an example
then fits a window, which is what the paper's context-level FIM achieves (a document-level split of a
10,000-token file would put prefix and middle in different windows). Draws come from a hash of the text, so
the output ignores worker count and corpus order. This module knows no tokenizer: `pack` hands it `encode`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from lmforge.errors import ConfigError

# Extensions that make a file source code for `is_code_corpus`.
CODE_EXTENSIONS = frozenset({
    ".py", ".pyi", ".pyx", ".js", ".mjs", ".ts", ".jsx", ".tsx", ".java", ".kt", ".scala", ".c", ".h", ".cc",
    ".cpp", ".cxx", ".hpp", ".cs", ".go", ".rs", ".rb", ".php", ".swift", ".sh", ".bash", ".lua", ".jl", ".r",
    ".sql", ".hs", ".ml", ".ex", ".erl", ".clj", ".dart", ".m", ".pl", ".zig",
})


@dataclass(frozen=True)
class FimConfig:
    """How packing applies FIM: the share of spans transformed, the share of those in SPM order, span length."""

    rate: float = 0.5
    spm_rate: float = 0.5
    span_tokens: int = 128

    def __post_init__(self) -> None:
        if not 0 <= self.rate <= 1:
            raise ConfigError(f"fim_rate={self.rate} must be in [0, 1]")
        if not 0 <= self.spm_rate <= 1:
            raise ConfigError(f"fim_spm_rate={self.spm_rate} must be in [0, 1]")
        if self.span_tokens < 8:
            raise ConfigError(f"fim_span_tokens={self.span_tokens} must be at least 8")


@dataclass(frozen=True)
class Sentinels:
    """The three FIM token ids and the end-of-text id that closes a transformed span."""

    prefix: int
    suffix: int
    middle: int
    eos: int


class HasSentinels(Protocol):
    """Anything with the three ids: `Sentinels`, or a tokenizer's `FimTokens`."""

    prefix: int
    suffix: int
    middle: int


def is_code_corpus(data: str | Path, glob: str | None = None) -> bool:
    """Whether FIM is on by default for `data`: the rule is that a corpus is code when `lmforge data clean
    --preset code` wrote it (its manifest.json says so), or when at least half of its files are source files by
    extension (`CODE_EXTENSIONS`). A JSONL of code without either mark is prose until told (`--fim-rate 0.5`)."""
    path = Path(data)
    manifest = path / "manifest.json" if path.is_dir() else None
    if manifest is not None and manifest.is_file():
        try:
            settings = json.loads(manifest.read_text(encoding="utf-8")).get("settings", {})
        except (OSError, ValueError, AttributeError):
            settings = {}
        if isinstance(settings, dict) and settings.get("preset") == "code":
            return True
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = [f for f in path.rglob(glob or "*") if f.is_file() and not any(p.startswith(".") for p in
                                                                                 f.relative_to(path).parts)]
    else:
        return False
    # A compressed file counts by the extension under .gz/.zst (app.py.gz is code).
    suffixes = [Path(f.name.removesuffix(".gz").removesuffix(".zst")).suffix.lower() for f in files]
    code = sum(s in CODE_EXTENSIONS for s in suffixes)
    return code > 0 and 2 * code >= len([s for s in suffixes if s != ".json"])


def _rng(text: str, seed: int) -> np.random.Generator:
    digest = hashlib.blake2b(f"fim\0{seed}\0{text}".encode(), digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(digest, "big"))


def spans(text: str, n_tokens: int, span_tokens: int) -> list[str]:
    """`text` cut into consecutive pieces of about `span_tokens` tokens (by the text's own characters per
    token), each ending at a line end where one falls in its second half; they join back to `text`."""
    if n_tokens <= span_tokens or len(text) < 2:
        return [text]
    width = max(2, len(text) * span_tokens // n_tokens)
    pieces, start = [], 0
    while len(text) - start > width:
        cut = text.rfind("\n", start + width // 2, start + width)
        end = cut + 1 if cut >= 0 else start + width
        pieces.append(text[start:end])
        start = end
    pieces.append(text[start:])
    return pieces


def split_points(length: int, rng: np.random.Generator) -> tuple[int, int]:
    """Two character positions in [0, length], drawn uniformly and sorted: prefix | middle | suffix."""
    lo, hi = sorted(int(x) for x in rng.integers(0, length + 1, size=2))
    return lo, hi


def arrange(prefix: Sequence[int], middle: Sequence[int], suffix: Sequence[int], s: HasSentinels, spm: bool
            ) -> list[int]:
    """One training example in PSM or SPM order (the middle last), without its closing eos."""
    return [*prompt(prefix, suffix, s, spm), *middle]


def prompt(prefix: Sequence[int], suffix: Sequence[int], s: HasSentinels, spm: bool = False) -> list[int]:
    """The inference prompt for a middle: the training example's order up to <MID> (PSM by default)."""
    if spm:
        return [s.prefix, s.suffix, *suffix, s.middle, *prefix]
    return [s.prefix, *prefix, s.suffix, *suffix, s.middle]


def transform(text: str, ids: list[int], encode: Callable[[list[str]], list[list[int]]], s: Sentinels,
              cfg: FimConfig, seed: int = 0) -> tuple[list[int], int]:
    """The token ids packing writes for one document (without its final eos) and how many spans became FIM.

    `ids` is the document's plain encoding, returned unchanged when no span is drawn for FIM.
    """
    rng = _rng(text, seed)
    pieces = spans(text, len(ids), cfg.span_tokens)
    chosen = [bool(rng.random() < cfg.rate) for _ in pieces]
    if not any(chosen):
        return ids, 0
    parts: list[str] = []
    plan: list[tuple[bool, bool]] = []  # (fim, spm) per piece
    for piece, fim in zip(pieces, chosen):
        if fim:
            lo, hi = split_points(len(piece), rng)
            parts += [piece[:lo], piece[lo:hi], piece[hi:]]
            plan.append((True, bool(rng.random() < cfg.spm_rate)))
        else:
            parts.append(piece)
            plan.append((False, False))
    encoded = iter(encode(parts))
    out: list[int] = []
    for i, (fim, spm) in enumerate(plan):
        if fim:
            prefix, middle, suffix = next(encoded), next(encoded), next(encoded)
            out += arrange(prefix, middle, suffix, s, spm)
            if i < len(plan) - 1:  # the document's own eos closes the last one
                out.append(s.eos)
        else:
            out += next(encoded)
    return out, sum(chosen)


def restore(ids: Sequence[int], decode: Callable[[list[int]], str], s: Sentinels) -> str:
    """The original text of one packed document (its ids without the final eos): undoes `transform`."""
    text = []
    segment: list[int] = []
    for token in [*ids, s.eos]:
        if token != s.eos:
            segment.append(token)
            continue
        text.append(_restore_segment(segment, decode, s))
        segment = []
    return "".join(text)


def _restore_segment(ids: list[int], decode: Callable[[list[int]], str], s: Sentinels) -> str:
    """Plain text pieces and FIM examples, in order; each example starts at <PRE> and its middle runs to the
    next <PRE> or the end (only the last example of a segment can be followed by nothing)."""
    out, i = [], 0
    while i < len(ids):
        if ids[i] != s.prefix:
            j = ids.index(s.prefix, i) if s.prefix in ids[i:] else len(ids)
            out.append(decode(list(ids[i:j])))
            i = j
            continue
        end = ids.index(s.prefix, i + 1) if s.prefix in ids[i + 1:] else len(ids)
        example = list(ids[i:end])
        mid = example.index(s.middle)
        if example[1] == s.suffix:  # SPM: suffix, then prefix + middle
            out.append(decode(example[mid + 1:]) + decode(example[2:mid]))
        else:
            suf = example.index(s.suffix)
            out.append(decode(example[1:suf]) + decode(example[mid + 1:]) + decode(example[suf + 1:mid]))
        i = end
    return "".join(out)


def prompt_ids(tok: Any, prefix: str, suffix: str, spm: bool = False) -> list[int]:
    """The ids a model is asked to continue with the middle between `prefix` and `suffix`: the tokenizer's
    own sentinels (`Tokenizer.fim`) around each side encoded on its own, after BOS where the tokenizer adds
    one, exactly as `transform` wrote training examples (and as StarCoder / Qwen-Coder expect)."""
    if tok.fim is None:
        raise ConfigError("this tokenizer has no fill-in-the-middle tokens (<|fim_prefix|>, <fim_prefix>, ...)")
    head = tok.encode("")  # [bos] when the tokenizer adds one
    pre, suf = tok.encode_batch([prefix, suffix], add_bos=False)
    return [*head, *prompt(pre, suf, tok.fim, spm)]
