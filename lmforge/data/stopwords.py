"""Word tokenization and stopword lists for English and Chinese, shipped with the package (no downloads).

Classic NLP (keyword statistics, TF-IDF baselines) wants words without function words, and the quality
filters use the density of function words as the signal that a document is natural language (Gopher,
Rae et al. 2021, App. A). English splits on word characters; Chinese has no spaces, so jieba segments it.
"""

from __future__ import annotations

import re
from functools import cache
from importlib.resources import files

from lmforge.errors import ConfigError

LANGUAGES = ("en", "zh")
# A word: letters/digits with inner apostrophes (don't, l'homme); CJK runs are handed to jieba.
_EN_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")
_HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


def _check(lang: str) -> str:
    lang = lang.lower().split("-")[0]
    if lang not in LANGUAGES:
        raise ConfigError(f"no stopword list for language {lang!r}; shipped: {', '.join(LANGUAGES)}")
    return lang


@cache
def stopwords(lang: str = "en") -> frozenset[str]:
    """The shipped stopword list of `lang` ("en" or "zh"), from lmforge/data/stopwords/<lang>.txt."""
    text = files("lmforge.data").joinpath("stopwords", f"{_check(lang)}.txt").read_text(encoding="utf-8")
    return frozenset(w.strip() for w in text.splitlines() if w.strip() and not w.startswith("#"))


@cache
def _jieba():
    import logging

    import jieba

    jieba.setLogLevel(logging.WARNING)  # it announces its dictionary load on every process otherwise
    return jieba


def tokenize_words(text: str, lang: str = "en") -> list[str]:
    """Lowercased words of `text`: regex words for English, jieba segments for Chinese (punctuation dropped).

    Chinese text may contain Latin words and numbers too; jieba keeps them whole.
    """
    if _check(lang) == "zh":
        return [w.lower() for w in _jieba().lcut(text) if _EN_WORD.fullmatch(w) or _HAN.search(w)]
    return [w.lower() for w in _EN_WORD.findall(text)]


def remove_stopwords(text: str, lang: str = "en") -> str:
    """The words of `text` that are not stopwords, space-separated (for Chinese too, so TF-IDF can split)."""
    stop = stopwords(lang)
    return " ".join(w for w in tokenize_words(text, lang) if w not in stop)


def stopword_count(words: list[str], lang: str = "en") -> int:
    stop = stopwords(lang)
    return sum(w in stop for w in words)


def has_han(text: str) -> bool:
    return _HAN.search(text) is not None
