"""Corpus readers, preprocessing (clean, dedup, PII, stopwords, annotation, stats), token packing.

Only the light preprocessing names are re-exported here (standard library and numpy underneath), so that
importing any `lmforge.data.*` module never drags in the tokenizer, torch or model code. Import the rest
from their modules: `lmforge.data.pack`, `lmforge.data.sft`, `lmforge.data.labelled`, `lmforge.data.annotate`.
"""

from lmforge.data.clean import Normalize, Tally, clean_document, iter_clean, normalize_text
from lmforge.data.dedup import exact_dedup, minhash_signature, near_dedup
from lmforge.data.filters import Filters, identify_language
from lmforge.data.pii import scrub_pii
from lmforge.data.pipeline import clean, dedup
from lmforge.data.readers import Skip, iter_texts, read_documents, read_rows
from lmforge.data.stats import stats
from lmforge.data.stopwords import remove_stopwords, stopwords, tokenize_words

__all__ = [
    "Filters", "Normalize", "Skip", "Tally", "clean", "clean_document", "dedup", "exact_dedup", "identify_language",
    "iter_clean", "iter_texts", "minhash_signature", "near_dedup", "normalize_text", "read_documents", "read_rows",
    "remove_stopwords", "scrub_pii", "stats", "stopwords", "tokenize_words",
]
