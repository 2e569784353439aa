"""Per-document cleaning: normalise text, identify its language, filter it, scrub PII.

`iter_clean` is the composable form: an iterator of documents in, an iterator of kept documents out,
with every removal counted in a `Tally` by rule. `lmforge data clean` (pipeline.py) runs it over shards
in parallel and adds corpus-wide exact deduplication.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, fields, replace
from html.parser import HTMLParser
from typing import Any, Literal

from lmforge.data.filters import Filters, check, check_language
from lmforge.data.pii import scrub_pii
from lmforge.data.readers import Record, Skip
from lmforge.data.stopwords import LANGUAGES, remove_stopwords
from lmforge.errors import ConfigError
from lmforge.options import given


@dataclass(frozen=True)
class Normalize:
    """Text normalisation; every step can be switched off.

    Args:
        unicode: Unicode normal form: "NFC" (canonical, lossless) or "NFKC" (also folds compatibility
            characters such as full-width Latin and ligatures); null leaves it.
        fix_mojibake: Repair text decoded with the wrong codec ("cafÃ©" → "café") with ftfy.
        control_chars: Drop control and format characters other than tab and newline.
        whitespace: Collapse runs of spaces inside lines (indentation is kept), strip line ends, allow at
            most one blank line in a row.
        strip_html: Reduce HTML/XML markup to its visible text (scripts and styles dropped).
        lowercase: Lowercase everything.
    """

    unicode: Literal["NFC", "NFKC"] | None = "NFC"
    fix_mojibake: bool = True
    control_chars: bool = True
    whitespace: bool = True
    strip_html: bool = False
    lowercase: bool = False


NORMALIZE = Normalize()
FILTERS = Filters()
Preset = Literal["prose", "code"]
# What each preset stands for: (normalisation, filters, PII scrub). Prose gets the web-text defaults; code is
# left byte-identical: indentation, blank lines (PEP 8's two), spacing inside lines and string contents all
# carry meaning, the Gopher rules measure prose, and an email placeholder inside a string changes a program.
PRESETS: dict[str, tuple[Normalize, Filters, bool]] = {
    "prose": (NORMALIZE, FILTERS, True),
    "code": (Normalize(unicode=None, fix_mojibake=False, control_chars=False, whitespace=False), Filters(enabled=False),
             False),
}


def preset_settings(preset: Preset, normalize: Normalize, filters: Filters, pii: bool | None
                    ) -> tuple[Normalize, Filters, bool]:
    """The preset's settings, overridden by what the user gave: on the command line, each option named
    (`--preset code --normalize.whitespace true` turns that one step back on); from Python, a `normalize`
    or `filters` other than the module defaults replaces the preset's whole, and `pii` where not None."""
    if preset not in PRESETS:
        raise ConfigError(f"preset={preset!r}: expected one of {sorted(PRESETS)}")
    base_normalize, base_filters, base_pii = PRESETS[preset]
    if preset == "prose":  # the defaults themselves: what was given stands as given
        return normalize, filters, base_pii if pii is None else pii
    written = given()

    def merge(base: Any, chosen: Any, default: Any, prefix: str) -> Any:
        if written is None:
            return base if chosen is default else chosen
        names = [f.name for f in fields(chosen)]
        named = {n for n in names if f"{prefix}.{n}" in written or prefix in written}
        if "config" in written:  # a --config file's values are given too, though not on the command line
            named |= {n for n in names if getattr(chosen, n) != getattr(default, n)}
        return replace(base, **{n: getattr(chosen, n) for n in named})

    return (merge(base_normalize, normalize, NORMALIZE, "normalize"), merge(base_filters, filters, FILTERS, "filters"),
            base_pii if pii is None else pii)


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u2064\ufeff]")
_SPACES = re.compile(r"[^\S\n]+")
_BLANKS = re.compile(r"\n{3,}")
_BLOCK_TAGS = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "blockquote", "section",
               "article", "table", "ul", "ol", "header", "footer", "title"}


class _TextExtractor(HTMLParser):
    """Visible text of an HTML document; block elements become line breaks."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.hidden = 0

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag in {"script", "style", "noscript", "template"}:
            self.hidden += 1
        elif tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in {"script", "style", "noscript", "template"}:
            self.hidden = max(0, self.hidden - 1)
        elif tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self.hidden:
            self.parts.append(data)


def strip_html(text: str) -> str:
    parser = _TextExtractor()
    parser.feed(text)
    parser.close()
    return "".join(parser.parts)


def _tidy_line(line: str) -> str:
    """Collapse inner runs of spaces and drop trailing ones, keeping the indentation (code depends on it)."""
    body = line.lstrip(" \t")
    return line[:len(line) - len(body)] + _SPACES.sub(" ", body).rstrip() if body else ""


def normalize_text(text: str, cfg: Normalize = NORMALIZE) -> str:
    """`text` after the enabled steps, in the order that keeps each one meaningful (mojibake first)."""
    if cfg.fix_mojibake:
        import ftfy

        # ftfy's own normalisation and HTML handling are ours to decide, so only its codec repairs run.
        text = ftfy.fix_text(text, normalization=None, unescape_html=False, fix_line_breaks=True,
                             fix_latin_ligatures=False, fix_character_width=False, uncurl_quotes=False)
    if cfg.strip_html:
        text = strip_html(text)
    if cfg.unicode:
        text = unicodedata.normalize(cfg.unicode, text)
    if cfg.control_chars:
        text = _CONTROL.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
    if cfg.whitespace:
        text = _BLANKS.sub("\n\n", "\n".join(map(_tidy_line, text.split("\n")))).strip("\n")
    if cfg.lowercase:
        text = text.lower()
    return text


@dataclass
class Tally:
    """What happened to every input document: kept, removed by a rule, or skipped with a reason.

    The invariant `documents == kept + sum(removed) + sum(skipped)` holds after every step.
    """

    documents: int = 0
    kept: int = 0
    removed: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    pii: Counter = field(default_factory=Counter)
    languages: Counter = field(default_factory=Counter)
    replaced_bytes: int = 0

    def add(self, other: Tally | dict) -> None:
        o = other if isinstance(other, Tally) else Tally.from_dict(other)
        self.documents += o.documents
        self.kept += o.kept
        self.replaced_bytes += o.replaced_bytes
        for name in ("removed", "skipped", "pii", "languages"):
            getattr(self, name).update(getattr(o, name))

    def as_dict(self) -> dict[str, Any]:
        return {"documents": self.documents, "kept": self.kept, "removed": dict(sorted(self.removed.items())),
                "skipped": dict(sorted(self.skipped.items())), "pii": dict(sorted(self.pii.items())),
                "languages": dict(self.languages.most_common()), "replaced_bytes": self.replaced_bytes}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Tally:
        return cls(d["documents"], d["kept"], Counter(d["removed"]), Counter(d["skipped"]), Counter(d["pii"]),
                   Counter(d["languages"]), d.get("replaced_bytes", 0))

    def balanced(self) -> bool:
        return self.documents == self.kept + sum(self.removed.values()) + sum(self.skipped.values())


def clean_document(doc: dict[str, Any], *, normalize: Normalize = NORMALIZE, filters: Filters = FILTERS,
                   pii: bool = True, stopwords: bool = False, tally: Tally | None = None) -> dict[str, Any] | str:
    """The cleaned document, or the name of the rule that removes it.

    Adds `lang` and `lang_score`. Filters see the text before PII placeholders replace anything, so a
    placeholder never counts as a word.
    """
    text = normalize_text(doc["text"], normalize)
    if not text:
        return "empty_after_normalize"
    lang, score, reason = check_language(text, filters)
    if reason is None:
        reason = check(text, filters, lang)
    if reason is not None:
        return reason
    if pii:
        text = scrub_pii(text, tally.pii if tally is not None else None)
    if stopwords:
        text = remove_stopwords(text, lang if lang in LANGUAGES else "en")
        if not text:
            return "empty_after_stopwords"
    return {**doc, "text": text, "lang": lang, "lang_score": round(score, 4)}


def iter_clean(records: Iterable[Record], tally: Tally | None = None, *, normalize: Normalize = NORMALIZE,
               filters: Filters = FILTERS, pii: bool = True, stopwords: bool = False,
               skips: list[Skip] | None = None) -> Iterator[dict[str, Any]]:
    """Kept documents of `records` (from `read_documents`); removals and skips are counted in `tally`.

    `Skip` records are counted and, if `skips` is a list, appended to it for the skip log.
    """
    tally = tally if tally is not None else Tally()
    for rec in records:
        tally.documents += 1
        if isinstance(rec, Skip):
            tally.skipped[rec.reason] += 1
            if skips is not None:
                skips.append(rec)
            continue
        out = clean_document(rec, normalize=normalize, filters=filters, pii=pii, stopwords=stopwords, tally=tally)
        if isinstance(out, str):
            tally.removed[out] += 1
            continue
        tally.kept += 1
        tally.languages[out["lang"]] += 1
        yield out
