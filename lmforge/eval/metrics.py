"""Evaluation metrics, each defined as its reference implementation defines it.

Classification follows scikit-learn (undefined ratios count as 0, like `zero_division=0`); BLEU, chrF
and TER are sacrebleu's corpus scores; ROUGE is Google's rouge-score; exact match and token F1 use the
SQuAD v1.1 answer normalisation; pass@k is the unbiased estimator of Chen et al. 2021.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Hashable, Sequence
from typing import Literal

from lmforge.errors import DataError

Average = Literal["micro", "macro", "weighted"]


def _check_lengths(a: Sequence, b: Sequence, names: tuple[str, str]) -> None:
    if len(a) != len(b):
        raise DataError(f"{names[0]} has {len(a)} items but {names[1]} has {len(b)}")
    if not a:
        raise DataError(f"{names[0]} is empty")


def accuracy(y_true: Sequence[Hashable], y_pred: Sequence[Hashable]) -> float:
    _check_lengths(y_true, y_pred, ("y_true", "y_pred"))
    return sum(t == p for t, p in zip(y_true, y_pred)) / len(y_true)


def confusion_matrix(y_true: Sequence[Hashable], y_pred: Sequence[Hashable],
                     labels: Sequence[Hashable] | None = None) -> list[list[int]]:
    """Rows are true labels, columns predicted ones, in `labels` order (default: sorted union)."""
    _check_lengths(y_true, y_pred, ("y_true", "y_pred"))
    labels = list(labels) if labels is not None else sorted(set(y_true) | set(y_pred))
    index = {label: i for i, label in enumerate(labels)}
    matrix = [[0] * len(labels) for _ in labels]
    for t, p in zip(y_true, y_pred):
        if t in index and p in index:
            matrix[index[t]][index[p]] += 1
    return matrix


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


def precision_recall_f1(y_true: Sequence[Hashable], y_pred: Sequence[Hashable], *,
                        average: Average | None = "macro",
                        labels: Sequence[Hashable] | None = None) -> dict:
    """Precision, recall and F1, averaged over classes or (average=None) per class.

    micro pools every decision; macro is the unweighted mean over classes; weighted weights each class
    by its support (number of true instances).
    """
    _check_lengths(y_true, y_pred, ("y_true", "y_pred"))
    labels = list(labels) if labels is not None else sorted(set(y_true) | set(y_pred))
    tp, fp, fn = Counter(), Counter(), Counter()
    for t, p in zip(y_true, y_pred):
        if t == p:
            tp[t] += 1
        else:
            fp[p] += 1
            fn[t] += 1
    per_class = {}
    for label in labels:
        precision = _ratio(tp[label], tp[label] + fp[label])
        recall = _ratio(tp[label], tp[label] + fn[label])
        per_class[label] = {"precision": precision, "recall": recall,
                            "f1": _ratio(2 * precision * recall, precision + recall),
                            "support": tp[label] + fn[label]}
    if average is None:
        return per_class
    if average == "micro":
        sum_tp = sum(tp[label] for label in labels)
        precision = _ratio(sum_tp, sum_tp + sum(fp[label] for label in labels))
        recall = _ratio(sum_tp, sum_tp + sum(fn[label] for label in labels))
        return {"precision": precision, "recall": recall, "f1": _ratio(2 * precision * recall, precision + recall)}
    if average == "macro":
        weights = {label: 1.0 for label in labels}
    elif average == "weighted":
        weights = {label: float(per_class[label]["support"]) for label in labels}
    else:
        raise DataError(f"average={average!r} is not one of micro, macro, weighted, None")
    total = sum(weights.values())
    return {key: _ratio(sum(weights[label] * per_class[label][key] for label in labels), total)
            for key in ("precision", "recall", "f1")}


def perplexity_from_nll(mean_nll: float) -> float:
    """exp of the mean negative log-likelihood per token (in nats)."""
    return math.exp(mean_nll)


def bits_per_byte(total_nll: float, n_bytes: int) -> float:
    """Total NLL in nats over the text's UTF-8 bytes, in bits: comparable across tokenizers."""
    if n_bytes <= 0:
        raise DataError(f"n_bytes={n_bytes} must be positive")
    return total_nll / (math.log(2) * n_bytes)


def _references_by_stream(references: Sequence[str] | Sequence[Sequence[str]], n: int) -> list[list[str]]:
    """sacrebleu wants one list per reference *stream*; accept one reference or several per hypothesis."""
    if len(references) != n:
        raise DataError(f"{n} hypotheses but {len(references)} references")
    per_item = [[r] if isinstance(r, str) else list(r) for r in references]
    width = max(len(r) for r in per_item)
    if any(len(r) != width for r in per_item):
        raise DataError("every hypothesis needs the same number of references")
    return [[item[i] for item in per_item] for i in range(width)]


def bleu(hypotheses: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]]) -> float:
    """Corpus BLEU (Papineni et al. 2002) as sacrebleu computes it (13a tokenisation), 0-100."""
    import sacrebleu

    return sacrebleu.corpus_bleu(list(hypotheses), _references_by_stream(references, len(hypotheses))).score


def chrf(hypotheses: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]]) -> float:
    """Corpus chrF (Popović 2015), sacrebleu's defaults, 0-100."""
    import sacrebleu

    return sacrebleu.corpus_chrf(list(hypotheses), _references_by_stream(references, len(hypotheses))).score


def ter(hypotheses: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]]) -> float:
    """Corpus translation edit rate (Snover et al. 2006), sacrebleu's defaults; lower is better."""
    import sacrebleu

    return sacrebleu.corpus_ter(list(hypotheses), _references_by_stream(references, len(hypotheses))).score


def rouge(predictions: Sequence[str], references: Sequence[str],
          types: Sequence[str] = ("rouge1", "rouge2", "rougeL")) -> dict[str, float]:
    """Mean ROUGE F-measure (Lin 2004) per type, with rouge-score's Porter stemming."""
    from rouge_score import rouge_scorer

    _check_lengths(predictions, references, ("predictions", "references"))
    scorer = rouge_scorer.RougeScorer(list(types), use_stemmer=True)
    totals = dict.fromkeys(types, 0.0)
    for prediction, reference in zip(predictions, references):
        scores = scorer.score(reference, prediction)
        for t in types:
            totals[t] += scores[t].fmeasure
    return {t: totals[t] / len(predictions) for t in types}


def normalize_answer(text: str) -> str:
    """SQuAD v1.1: lowercase, drop punctuation and the articles a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, ground_truths: str | Sequence[str]) -> float:
    truths = [ground_truths] if isinstance(ground_truths, str) else ground_truths
    return float(any(normalize_answer(prediction) == normalize_answer(t) for t in truths))


def token_f1(prediction: str, ground_truths: str | Sequence[str]) -> float:
    """SQuAD token-overlap F1, the best over the ground truths."""
    truths = [ground_truths] if isinstance(ground_truths, str) else ground_truths

    def f1(truth: str) -> float:
        pred_tokens, truth_tokens = normalize_answer(prediction).split(), normalize_answer(truth).split()
        common = sum((Counter(pred_tokens) & Counter(truth_tokens)).values())
        if not pred_tokens or not truth_tokens:
            return float(pred_tokens == truth_tokens)
        if common == 0:
            return 0.0
        precision, recall = common / len(pred_tokens), common / len(truth_tokens)
        return 2 * precision * recall / (precision + recall)

    return max(f1(t) for t in truths)


def pass_at_k(n: int, c: int, k: int) -> float:
    """P(at least one of k samples passes) given c of n passed: 1 − C(n−c, k)/C(n, k), unbiased.

    Computed as a product (Chen et al. 2021, fig. 3) so large n does not overflow.
    """
    if not 0 <= c <= n or k < 1:
        raise DataError(f"pass@k needs 0 <= c <= n and k >= 1 (got n={n}, c={c}, k={k})")
    if k > n:
        raise DataError(f"pass@{k} needs at least {k} samples per problem, got n={n}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod
