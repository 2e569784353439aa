"""The n-gram model's probabilities: modified Kneser–Ney against the paper's formulas, Kneser–Ney against NLTK."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
from nltk.lm.models import InterpolatedLanguageModel
from nltk.lm.smoothing import KneserNey
from nltk.util import everygrams

from lmforge.errors import ConfigError
from lmforge.model.ngram import NgramLM, count_ngrams, modified_discounts

TYPES, V = 120, 130  # tokens 120..129 never occur: only the uniform floor gives them probability


def zipf_tokens(n: int, seed: int) -> list[int]:
    """A Zipf-like stream with some local structure, so every order has counts 1, 2, 3 and 4."""
    rng = np.random.default_rng(seed)
    weights = 1 / np.arange(1, TYPES + 1)
    draws = rng.choice(TYPES, size=n, p=weights / weights.sum())
    out = [int(draws[0])]
    for i in range(1, n):
        out.append((out[-1] * 7 + 3) % 20 if rng.random() < 0.4 else int(draws[i]))
    return out


def reference_modified_kn(tokens: list[int], order: int, vocab: int):
    """p(w | h) written straight from Chen & Goodman (1998), eq. 17 and 26, with dictionaries.

    Raw counts at the top order, continuation counts N₁₊(·g) below; three discounts per order from its
    count-of-counts; γ(h) = Σ_r D_r N_r(h·) / c(h·); an unseen history defers to the shorter one; the
    unigram level interpolates with the uniform distribution over the vocabulary.
    """
    grams = {k: Counter(tuple(tokens[i:i + k]) for i in range(len(tokens) - k + 1)) for k in range(1, order + 2)}
    counts = {order: grams[order]}
    for k in range(1, order):
        counts[k] = Counter(g[1:] for g in grams[k + 1])
    discounts = {}
    for k in range(1, order + 1):
        n = [sum(1 for c in counts[k].values() if c == r) for r in (1, 2, 3, 4)]
        assert min(n) > 0, f"order {k} lacks a count-of-count; the corpus is too small for this test"
        y = n[0] / (n[0] + 2 * n[1])
        discounts[k] = (1 - 2 * y * n[1] / n[0], 2 - 3 * y * n[2] / n[1], 3 - 4 * y * n[3] / n[2])

    following: dict[tuple[int, ...], dict[int, int]] = {}  # history → {token: count} over every order
    for k in range(1, order + 1):
        for g, c in counts[k].items():
            if c > 0:
                following.setdefault(g[:-1], {})[g[-1]] = c

    def p(w: int, h: tuple[int, ...]) -> float:
        h = h[max(0, len(h) - (order - 1)):] if order > 1 else ()
        k = len(h) + 1
        lower = p(w, h[1:]) if h else 1 / vocab
        follows = following.get(h, {})
        total = sum(follows.values())
        if total == 0:
            return lower
        d = discounts[k]
        discount = {c: d[min(c, 3) - 1] for c in follows.values()}
        alpha = max(follows.get(w, 0) - discount.get(follows.get(w, 0), 0), 0) / total
        gamma = sum(discount[c] for c in follows.values()) / total
        return alpha + gamma * lower

    return p, discounts


def model_probs(model: NgramLM, seq: list[int]) -> np.ndarray:
    return model(torch.tensor([seq])).double().exp()[0].numpy()


@pytest.mark.parametrize("order", [2, 3, 4])
def test_modified_kneser_ney_equals_the_papers_formulas(order: int) -> None:
    """Every probability of the default (modified, three-discount) model equals an independent dictionary
    implementation of Chen & Goodman's equations, for every token of the vocabulary at every position of
    unseen text — histories seen, unseen, shorter than n−1 at the start, and tokens never seen at all."""
    train = zipf_tokens(3000, seed=0)
    model = NgramLM.fit(np.array(train), order, V)
    reference, discounts = reference_modified_kn(train, order, V)
    for k in range(1, order + 1):
        assert model.config.discounts[k - 1] == pytest.approx(list(discounts[k]), rel=1e-12)
    test = [*zipf_tokens(25, seed=1)[:23], 125, 2]  # 125 never occurs in training
    probs = model_probs(model, test)
    for t in range(len(test)):
        expected = [reference(w, tuple(test[:t + 1])) for w in range(V)]
        assert probs[t] == pytest.approx(expected, rel=2e-6, abs=1e-9)
    assert probs.sum(-1) == pytest.approx(np.ones(len(test)), abs=1e-5)
    assert probs[:, TYPES:].min() > 0  # the uniform floor


class _CheckedKneserNey(KneserNey):
    """NLTK's Kneser–Ney estimator with only its recursion's base case changed (see the test)."""

    def unigram_score(self, word: str) -> float:
        count, total = self._continuation_counts(word)
        if not hasattr(self, "types"):  # tokens seen after another one
            self.types = sum(self._continuation_counts(str(w))[0] > 0 for w in range(V))
        types = self.types
        return max(count - self.discount, 0) / total + self.discount * types / total / V


@pytest.mark.parametrize("order", [2, 3])
def test_single_discount_kneser_ney_equals_nltk(order: int) -> None:
    """With `discount=0.1` the model is interpolated Kneser–Ney as NLTK's `KneserNeyInterpolated` computes it.

    NLTK ends the recursion at the undiscounted unigram continuation distribution, which gives a token never
    seen after another one probability zero; Chen & Goodman (and lmforge) discount that level too and
    interpolate it with the uniform distribution. The reference therefore overrides NLTK's `unigram_score`
    alone with that formula; the top order's discounted raw counts, the continuation counts below it, γ, the
    recursion and the backoff from unseen histories are NLTK's own. The corpus is repeated once so that every
    n-gram at its start also has a left neighbour (NLTK's γ counts raw continuation types, ours continuation
    counts; they agree then).
    """
    train = zipf_tokens(300, seed=2)
    train = train + train
    words = [str(t) for t in train]
    reference = InterpolatedLanguageModel(_CheckedKneserNey, order, params={"discount": 0.1, "order": order})
    reference.fit([list(everygrams(words, max_len=order))], vocabulary_text=words)
    model = NgramLM.fit(np.array(train), order, V, discount=0.1)
    test = [*zipf_tokens(12, seed=3), 123]
    probs = model_probs(model, test)
    for t in range(len(test)):
        history = tuple(str(x) for x in test[max(0, t + 2 - order):t + 1])
        expected = [reference.unmasked_score(str(w), history) for w in range(V)]
        assert probs[t] == pytest.approx(expected, rel=2e-6, abs=1e-9)


def test_counts_are_raw_at_the_top_and_continuation_counts_below() -> None:
    """"a b a b c": bigram counts are raw (a b: 2); unigram counts are distinct left neighbours (b: 1, a: 1)."""
    keys, counts = count_ngrams(np.array([0, 1, 0, 1, 2]), 2, 3)
    assert keys[0].tolist() == [0, 1, 2] and counts[0].tolist() == [1, 1, 1]
    bigrams = {(int(k) // 3, int(k) % 3): int(c) for k, c in zip(keys[1], counts[1])}
    # the bigram key is (index of its first token in the unigram table) · V + second token
    assert bigrams == {(0, 1): 2, (1, 0): 1, (1, 2): 1}


def test_modified_discounts_follow_the_count_of_counts() -> None:
    counts = np.array([1] * 10 + [2] * 4 + [3] * 2 + [4] * 1)
    y = 10 / 18
    assert modified_discounts(counts) == pytest.approx([1 - 2 * y * 4 / 10, 2 - 3 * y * 2 / 4, 3 - 4 * y * 1 / 2])
    assert modified_discounts(np.array([1, 1, 2])) == pytest.approx([2 / 4] * 3)  # n₃ = 0: the single estimate


def test_a_history_longer_than_n_minus_1_is_ignored() -> None:
    train = zipf_tokens(500, seed=4)
    model = NgramLM.fit(np.array(train), 3, V)
    a = model(torch.tensor([[5, 9, 1, 2, 3]]))[0, -1]
    b = model(torch.tensor([[2, 3]]))[0, -1]
    assert torch.allclose(a, b)
    assert math.isclose(float(a.exp().sum()), 1.0, rel_tol=1e-5)


def test_bad_discount_and_too_short_corpus_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"discount=1\.5"):
        NgramLM.fit(np.array([1, 2, 3]), 2, 5, discount=1.5)
    with pytest.raises(ConfigError, match="too few for a 5-gram"):
        NgramLM.fit(np.array([1, 2, 3]), 5, 5)
    with pytest.raises(ConfigError, match=r"token ids must be in \[0, 3\)"):
        NgramLM.fit(np.array([1, 7]), 2, 3)
