"""Document quality filters: the Gopher heuristics, a stopword signal, language ID and word lists.

Defaults are the published MassiveWeb rules of Gopher (Rae et al. 2021, "Scaling Language Models:
Methods, Analysis & Insights from Training Gopher", Appendix A.1.1): keep a document with 50–100,000
words, mean word length 3–10 characters, a symbol-to-word ratio below 0.1 for "#" and "...", at most
90% of lines starting with a bullet and 30% ending with an ellipsis, at least 80% of words with an
alphabetic character, and at least two English stopwords; and the repetition rules of A.1.2 (duplicate
line / paragraph fractions, top n-gram and duplicate n-gram character fractions). Each rule that fails
is reported by name so `clean` can count removals per rule.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from lmforge.data.stopwords import LANGUAGES, has_han, stopword_count, tokenize_words
from lmforge.errors import ConfigError

_BULLETS = ("•", "●", "◦", "‣", "⁃", "-", "*", "·")
_ELLIPSES = ("...", "…")
_LANGID_CHARS = 600  # a few sentences settle the language (Lui & Baldwin 2012); more only costs time
_ALPHA_WORD = re.compile(r"\S*[^\W\d_]\S*")  # a whitespace-separated word with at least one letter


@dataclass(frozen=True)
class Filters:
    """Quality filter thresholds (Gopher defaults, Rae et al. 2021, App. A); `None` turns a rule off.

    Args:
        enabled: Apply the quality filters at all (off for code or other non-prose corpora).
        min_words: Fewest words a document may have.
        max_words: Most words a document may have.
        min_mean_word_length: Shortest mean word length, in characters (not applied to Chinese).
        max_mean_word_length: Longest mean word length, in characters (not applied to Chinese).
        max_symbol_word_ratio: Most "#" and "..." per word.
        max_bullet_lines: Largest fraction of lines that may start with a bullet.
        max_ellipsis_lines: Largest fraction of lines that may end with an ellipsis.
        min_alpha_words: Smallest fraction of words that contain an alphabetic character.
        min_stopwords: Fewest stopwords of the document's language (the natural-language signal).
        max_duplicate_lines: Largest fraction of lines that repeat an earlier line.
        max_duplicate_paragraphs: Largest fraction of paragraphs that repeat an earlier one.
        max_duplicate_line_chars: Largest fraction of characters in repeated lines.
        max_duplicate_paragraph_chars: Largest fraction of characters in repeated paragraphs.
        max_top_ngram_chars: For n = 2, 3, 4: largest fraction of characters in the most frequent n-gram.
        max_duplicate_ngram_chars: For n = 5..10: largest fraction of characters in repeated n-grams.
        languages: Keep only these language codes (e.g. ["en", "zh"]); None keeps every language.
        min_language_score: Smallest language-ID probability for a document to count as its language.
        blocklist: A word-list file (one word or phrase per line); documents containing any are removed.
    """

    enabled: bool = True
    min_words: int | None = 50
    max_words: int | None = 100_000
    min_mean_word_length: float | None = 3.0
    max_mean_word_length: float | None = 10.0
    max_symbol_word_ratio: float | None = 0.1
    max_bullet_lines: float | None = 0.9
    max_ellipsis_lines: float | None = 0.3
    min_alpha_words: float | None = 0.8
    min_stopwords: int | None = 2
    max_duplicate_lines: float | None = 0.3
    max_duplicate_paragraphs: float | None = 0.3
    max_duplicate_line_chars: float | None = 0.2
    max_duplicate_paragraph_chars: float | None = 0.2
    max_top_ngram_chars: tuple[float, float, float] | None = (0.20, 0.18, 0.16)
    max_duplicate_ngram_chars: tuple[float, float, float, float, float, float] | None = (
        0.15, 0.14, 0.13, 0.12, 0.11, 0.10)
    languages: list[str] | None = None
    min_language_score: float = 0.5
    blocklist: Path | None = None


@cache
def _identifier():
    # py3langid ships its model inside the wheel (langid.py, Lui & Baldwin 2012): no download, works offline.
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def identify_language(text: str) -> tuple[str, float]:
    """(ISO 639-1 code, probability) of `text`'s language, from its first 600 characters."""
    lang, prob = _identifier().classify(text[:_LANGID_CHARS])
    return lang, float(prob)


@cache
def _blocklist(path: Path | None) -> tuple[re.Pattern, ...] | None:
    if path is None:
        return None
    try:
        words = [w.strip().lower() for w in Path(path).read_text(encoding="utf-8").splitlines()]
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the blocklist ({e.strerror})") from None
    words = [w for w in words if w and not w.startswith("#")]
    latin = [re.escape(w) for w in words if not has_han(w)]
    han = [re.escape(w) for w in words if has_han(w)]
    pats = []
    if latin:
        pats.append(re.compile(r"(?<!\w)(?:" + "|".join(latin) + r")(?!\w)"))
    if han:
        pats.append(re.compile("|".join(han)))  # Chinese has no word boundaries to anchor on
    return tuple(pats)


def _duplicates(items: list[str]) -> tuple[float, float]:
    """(fraction of items that repeat an earlier one, fraction of characters in those repeats)."""
    seen: set[str] = set()
    dup = dup_chars = total_chars = 0
    for it in items:
        total_chars += len(it)
        if it in seen:
            dup += 1
            dup_chars += len(it)
        seen.add(it)
    return dup / max(len(items), 1), dup_chars / max(total_chars, 1)


def _top_ngram_fraction(words: list[str], n: int) -> float:
    """Characters covered by the most frequent word n-gram, as a fraction of all word characters."""
    if len(words) < n:
        return 0.0
    counts = Counter(zip(*(words[i:] for i in range(n))))
    gram, count = counts.most_common(1)[0]
    if count < 2:
        return 0.0
    return count * sum(map(len, gram)) / max(sum(map(len, words)), 1)


def _duplicate_ngram_fraction(words: list[str], n: int) -> float:
    """Characters in word n-grams that occur more than once (each word counted once), over all characters."""
    if len(words) < n:
        return 0.0
    grams = list(zip(*(words[i:] for i in range(n))))
    counts = Counter(grams)
    if len(counts) == len(grams):
        return 0.0
    covered = [False] * len(words)
    for i, g in enumerate(grams):
        if counts[g] > 1:
            covered[i:i + n] = [True] * n
    return sum(len(w) for w, c in zip(words, covered) if c) / max(sum(map(len, words)), 1)


def _over(value: float, limit: float | None) -> bool:
    return limit is not None and value > limit


def _under(value: float, limit: float | None) -> bool:
    return limit is not None and value < limit


def check(text: str, cfg: Filters, lang: str | None = None) -> str | None:
    """The name of the first rule `text` fails, or None to keep it. `lang` picks tokenizer and stopwords."""
    if not cfg.enabled:
        return None
    lang = lang if lang in LANGUAGES else "en"
    words = tokenize_words(text, lang)
    n = len(words)
    if _under(n, cfg.min_words):
        return "min_words"
    if _over(n, cfg.max_words):
        return "max_words"
    if lang != "zh" and n:
        mean = sum(map(len, words)) / n
        if _under(mean, cfg.min_mean_word_length):
            return "min_mean_word_length"
        if _over(mean, cfg.max_mean_word_length):
            return "max_mean_word_length"
    symbols = text.count("#") + sum(text.count(e) for e in _ELLIPSES)
    if _over(symbols / max(n, 1), cfg.max_symbol_word_ratio):
        return "max_symbol_word_ratio"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if lines:
        if _over(sum(ln.startswith(_BULLETS) for ln in lines) / len(lines), cfg.max_bullet_lines):
            return "max_bullet_lines"
        if _over(sum(ln.endswith(_ELLIPSES) for ln in lines) / len(lines), cfg.max_ellipsis_lines):
            return "max_ellipsis_lines"
    n_raw = len(text.split())
    if n_raw and _under(len(_ALPHA_WORD.findall(text)) / n_raw, cfg.min_alpha_words):
        return "min_alpha_words"
    if cfg.min_stopwords is not None and stopword_count(words, lang) < cfg.min_stopwords:
        return "min_stopwords"
    if reason := _repetition(text, lines, words, cfg):
        return reason
    if (pats := _blocklist(cfg.blocklist)) and any(p.search(text.lower()) for p in pats):
        return "blocklist"
    return None


def _repetition(text: str, lines: list[str], words: list[str], cfg: Filters) -> str | None:
    """Gopher's repetition removal (Rae et al. 2021, App. A.1.2, Table A1)."""
    line_frac, line_chars = _duplicates(lines)
    if _over(line_frac, cfg.max_duplicate_lines):
        return "max_duplicate_lines"
    if _over(line_chars, cfg.max_duplicate_line_chars):
        return "max_duplicate_line_chars"
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    para_frac, para_chars = _duplicates(paragraphs)
    if _over(para_frac, cfg.max_duplicate_paragraphs):
        return "max_duplicate_paragraphs"
    if _over(para_chars, cfg.max_duplicate_paragraph_chars):
        return "max_duplicate_paragraph_chars"
    for n, limit in zip((2, 3, 4), cfg.max_top_ngram_chars or ()):
        if _over(_top_ngram_fraction(words, n), limit):
            return f"max_top_{n}gram_chars"
    for n, limit in zip(range(5, 11), cfg.max_duplicate_ngram_chars or ()):
        frac = _duplicate_ngram_fraction(words, n)
        if _over(frac, limit):
            return f"max_duplicate_{n}gram_chars"
        if frac == 0:  # no repeated n-gram means no repeated longer one either
            break
    return None


def check_language(text: str, cfg: Filters) -> tuple[str, float, str | None]:
    """(language, probability, failed rule or None) under `cfg.languages` / `cfg.min_language_score`."""
    lang, prob = identify_language(text)
    if cfg.enabled and cfg.languages is not None:
        if lang not in cfg.languages:
            return lang, prob, "language"
        if prob < cfg.min_language_score:
            return lang, prob, "min_language_score"
    return lang, prob, None
