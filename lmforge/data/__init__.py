"""Corpus readers, preprocessing (clean, dedup, PII, stopwords, annotation, stats), token packing."""

from lmforge.data.annotate import PREDICTOR_LOADERS, Predictor, RulePredictor, annotate, merge_labels, validate
from lmforge.data.clean import Normalize, Tally, clean_document, iter_clean, normalize_text
from lmforge.data.datasets import iter_documents, list_files
from lmforge.data.dedup import exact_dedup, minhash_signature, near_dedup
from lmforge.data.filters import Filters, identify_language
from lmforge.data.pack import PackedDataset, WindowLoader, pack
from lmforge.data.pii import scrub_pii
from lmforge.data.pipeline import clean, dedup
from lmforge.data.readers import Skip, read_documents
from lmforge.data.stats import stats
from lmforge.data.stopwords import remove_stopwords, stopwords, tokenize_words

__all__ = [
    "PREDICTOR_LOADERS", "Filters", "Normalize", "PackedDataset", "Predictor", "RulePredictor", "Skip", "Tally",
    "WindowLoader", "annotate", "clean", "clean_document", "dedup", "exact_dedup", "identify_language",
    "iter_clean", "iter_documents", "list_files", "merge_labels", "minhash_signature", "near_dedup",
    "normalize_text", "pack", "read_documents", "remove_stopwords", "scrub_pii", "stats", "stopwords",
    "tokenize_words", "validate",
]
