"""Each metric equals its reference implementation on random inputs."""

from __future__ import annotations

import math
import random

import pytest
import sacrebleu
from rouge_score import rouge_scorer
from sklearn import metrics as sk

from lmforge.errors import DataError
from lmforge.eval import metrics

WORDS = ["the", "cat", "sat", "on", "a", "mat", "while", "dogs", "ran", "across", "green", "fields", "under",
         "bright", "summer", "skies"]


def random_labels(seed: int, n: int = 200, classes: str = "abcde") -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    y_true = [rng.choice(classes) for _ in range(n)]
    y_pred = [t if rng.random() < 0.6 else rng.choice(classes[:-1]) for t in y_true]  # 'e' never predicted
    return y_true, y_pred


def random_sentences(seed: int, n: int = 30) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 15))) + "." for _ in range(n)]


@pytest.mark.parametrize("seed", range(5))
def test_accuracy_and_confusion_matrix_match_sklearn(seed):
    y_true, y_pred = random_labels(seed)
    assert metrics.accuracy(y_true, y_pred) == pytest.approx(sk.accuracy_score(y_true, y_pred))
    labels = sorted(set(y_true) | set(y_pred))
    assert metrics.confusion_matrix(y_true, y_pred) == sk.confusion_matrix(y_true, y_pred, labels=labels).tolist()


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("average", ["micro", "macro", "weighted"])
def test_precision_recall_f1_match_sklearn(seed, average):
    """Including a class that is never predicted, where precision is undefined and counts as 0."""
    y_true, y_pred = random_labels(seed)
    p, r, f, _ = sk.precision_recall_fscore_support(y_true, y_pred, average=average, zero_division=0)
    ours = metrics.precision_recall_f1(y_true, y_pred, average=average)
    assert (ours["precision"], ours["recall"], ours["f1"]) == pytest.approx((p, r, f))


def test_per_class_scores_match_sklearn():
    y_true, y_pred = random_labels(7)
    labels = sorted(set(y_true))
    p, r, f, support = sk.precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    ours = metrics.precision_recall_f1(y_true, y_pred, average=None, labels=labels)
    for i, label in enumerate(labels):
        assert ours[label]["precision"] == pytest.approx(p[i])
        assert ours[label]["recall"] == pytest.approx(r[i])
        assert ours[label]["f1"] == pytest.approx(f[i])
        assert ours[label]["support"] == support[i]


@pytest.mark.parametrize("seed", range(3))
def test_bleu_chrf_ter_equal_sacrebleu(seed):
    hyps, refs = random_sentences(seed), random_sentences(seed + 100)
    assert metrics.bleu(hyps, refs) == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert metrics.chrf(hyps, refs) == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)
    assert metrics.ter(hyps, refs) == pytest.approx(sacrebleu.corpus_ter(hyps, [refs]).score)


def test_bleu_with_several_references_per_hypothesis():
    hyps, refs_a, refs_b = random_sentences(1), random_sentences(2), random_sentences(3)
    ours = metrics.bleu(hyps, [[a, b] for a, b in zip(refs_a, refs_b)])
    assert ours == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs_a, refs_b]).score)


@pytest.mark.parametrize("seed", range(3))
def test_rouge_equals_rouge_score(seed):
    preds, refs = random_sentences(seed), random_sentences(seed + 50)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    expected = {t: sum(scorer.score(r, p)[t].fmeasure for p, r in zip(preds, refs)) / len(preds)
                for t in ("rouge1", "rouge2", "rougeL")}
    assert metrics.rouge(preds, refs) == pytest.approx(expected)


def test_squad_exact_match_and_f1():
    """Worked examples of the SQuAD v1.1 script's normalisation and token overlap."""
    assert metrics.normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert metrics.exact_match("the Eiffel tower", ["Eiffel Tower", "Paris"]) == 1.0
    assert metrics.exact_match("tower", "Eiffel Tower") == 0.0
    assert metrics.token_f1("Eiffel tower in Paris", "the Eiffel Tower") == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert metrics.token_f1("Paris", ["London", "paris."]) == 1.0
    assert metrics.token_f1("nothing", "something else") == 0.0


@pytest.mark.parametrize(("n", "c", "k"), [(10, 0, 1), (10, 3, 1), (10, 3, 5), (20, 19, 2), (200, 7, 100), (5, 5, 5)])
def test_pass_at_k_equals_the_combinatorial_formula(n, c, k):
    expected = 1.0 - math.comb(n - c, k) / math.comb(n, k)
    assert metrics.pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_1_is_the_pass_rate():
    assert metrics.pass_at_k(50, 13, 1) == pytest.approx(13 / 50)


def test_bits_per_byte_and_perplexity():
    assert metrics.perplexity_from_nll(math.log(20)) == pytest.approx(20)
    assert metrics.bits_per_byte(8 * math.log(2), 4) == pytest.approx(2.0)


def test_bad_inputs_are_data_errors():
    with pytest.raises(DataError, match="2 items"):
        metrics.accuracy(["a", "b"], ["a"])
    with pytest.raises(DataError, match="empty"):
        metrics.accuracy([], [])
    with pytest.raises(DataError, match="samples"):
        metrics.pass_at_k(3, 1, 5)
    with pytest.raises(DataError, match="references"):
        metrics.bleu(["a b"], ["a", "b"])
