"""`lmforge eval --task translation | summarization --data test.jsonl`: generate for every source, score with
the field's own tools, and put the baselines in the same table.

Translation is scored by sacrebleu (BLEU, chrF, TER), whose signature (tokenizer, smoothing, version) is
reported with the numbers, since a BLEU without one cannot be compared with anything; summarization by
Google's rouge-score (ROUGE-1, ROUGE-2 and ROUGE-Lsum F-measures, Porter stemming). ROUGE-Lsum is the
summary-level LCS (Lin 2004, §3.2): sentences are put on lines of their own first, as rouge-score expects.

Baselines take the place of a model (`--model copy | lead | dictionary`):
    copy        the source itself (translation: what a system gets for free from names and numbers)
    lead        the source's first sentence (summarization's classic baseline; for code, its first line)
    dictionary  word for word through a dictionary learned from the training pairs beside the test file:
                each source word becomes the target word most associated with it (Dice coefficient of
                their co-occurrence in training pairs; Smadja et al. 1996), unknown words are copied
"""

from __future__ import annotations

import hashlib
import re
import sys
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from lmforge.data.pairs import load_pairs, split_file
from lmforge.errors import ConfigError, DataError
from lmforge.progress import Progress

TASKS = ("translation", "summarization")
BASELINES = ("copy", "lead", "dictionary")
_WORD = re.compile(r"\w+(?:[-'’]\w+)*|[^\w\s]", re.UNICODE)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=\S)")


class Predictor(Protocol):
    """What generates for a list of sources: a baseline, or a model's `translate`."""

    def __call__(self, sources: list[str]) -> list[str]: ...


# ---- metrics ------------------------------------------------------------------------------------------


def translation_scores(hypotheses: Sequence[str], references: Sequence[str]) -> tuple[dict[str, float], dict[str, str]]:
    """Corpus BLEU, chrF and TER (sacrebleu defaults, one reference each) and each metric's signature."""
    from sacrebleu.metrics import BLEU, CHRF, TER

    _check(hypotheses, references)
    values, signatures = {}, {}
    for name, metric in (("bleu", BLEU()), ("chrf", CHRF()), ("ter", TER())):
        values[name] = metric.corpus_score(list(hypotheses), [list(references)]).score
        signatures[name] = str(metric.get_signature())
    return values, signatures


def sentence_lines(text: str) -> str:
    """One sentence per line, as ROUGE-Lsum wants (a split after . ! or ? followed by a space)."""
    return "\n".join(s.strip() for s in _SENTENCE_END.split(text.strip()) if s.strip())


def summarization_scores(predictions: Sequence[str], references: Sequence[str]) -> tuple[dict[str, float],
                                                                                         dict[str, str]]:
    """Mean ROUGE-1, ROUGE-2 and ROUGE-Lsum F-measures (rouge-score, Porter stemmer), 0-1."""
    from importlib.metadata import version

    from rouge_score import rouge_scorer

    _check(predictions, references)
    types = ("rouge1", "rouge2", "rougeLsum")
    scorer = rouge_scorer.RougeScorer(list(types), use_stemmer=True)
    totals = dict.fromkeys(types, 0.0)
    for prediction, reference in zip(predictions, references):
        scores = scorer.score(sentence_lines(reference), sentence_lines(prediction))
        for t in types:
            totals[t] += scores[t].fmeasure
    signature = f"rouge-score {version('rouge-score')}|stemmer:porter|fmeasure|mean|lsum-split:sentence-end"
    return {t: totals[t] / len(predictions) for t in types}, dict.fromkeys(types, signature)


def scores(task: str, predictions: Sequence[str], references: Sequence[str]) -> tuple[dict[str, float],
                                                                                      dict[str, str]]:
    if task == "translation":
        return translation_scores(predictions, references)
    if task == "summarization":
        return summarization_scores(predictions, references)
    raise ConfigError(f"--task {task!r}: one of {', '.join(TASKS)}")


def _check(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise DataError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        raise DataError("nothing to score: no examples")


# ---- baselines ----------------------------------------------------------------------------------------


def words(text: str) -> list[str]:
    """Words (hyphenated and apostrophe'd ones whole) and punctuation marks, in order."""
    return _WORD.findall(text)


def detokenize(tokens: list[str]) -> str:
    """Words joined by spaces, no space before closing punctuation nor after an opening mark."""
    text = ""
    for token in tokens:
        if text and not (token in ",.;:!?)]»”’" or text[-1] in "(¡¿[«“"):
            text += " "
        text += token
    return text


def copy_source(sources: list[str]) -> list[str]:
    return list(sources)


def lead(sources: list[str]) -> list[str]:
    """The first sentence of each source (the first line, where a source has several: code)."""
    firsts = []
    for source in sources:
        text = source.strip()
        first_line = text.splitlines()[0] if text else ""
        firsts.append(first_line if "\n" in text else _SENTENCE_END.split(text)[0])
    return firsts


class WordDictionary:
    """Word-for-word translation through the target word of highest Dice coefficient per source word.

    Dice(s, t) = 2·c(s, t) / (c(s) + c(t)), with c counting the training pairs a word (or both) occurs in:
    cheap, symmetric, and not fooled by frequent target words as raw co-occurrence counts are.
    """

    def __init__(self, table: dict[str, str]) -> None:
        self.table = table

    @classmethod
    def learn(cls, sources: list[str], targets: list[str], *, min_count: int = 2, min_dice: float = 0.1
              ) -> WordDictionary:
        source_count: Counter[str] = Counter()
        target_count: Counter[str] = Counter()
        joint: defaultdict[str, Counter[str]] = defaultdict(Counter)
        for source, target in zip(sources, targets):
            s_words = {w.lower() for w in words(source)}
            t_words = {w.lower() for w in words(target)}
            source_count.update(s_words)
            target_count.update(t_words)
            for s in s_words:
                if s.isalnum() or "-" in s or "'" in s:
                    joint[s].update(t_words)
        table = {}
        for s, counts in joint.items():
            if source_count[s] < min_count:
                continue
            best, dice = max(((t, 2 * c / (source_count[s] + target_count[t])) for t, c in counts.items()),
                             key=lambda item: (item[1], item[0]))
            if dice >= min_dice:
                table[s] = best
        return cls(table)

    def translate_one(self, source: str) -> str:
        out = []
        for word in words(source):
            found = self.table.get(word.lower())
            if found is None:
                out.append(word)  # names, numbers, punctuation: copied
            else:
                out.append(found.capitalize() if word[:1].isupper() else found)
        return detokenize(out)

    def __call__(self, sources: list[str]) -> list[str]:
        return [self.translate_one(s) for s in sources]


@dataclass(frozen=True)
class Baseline:
    """A baseline in the place of a model: its name (for the report) and what it predicts."""

    name: str
    predict: Predictor

    def __call__(self, sources: list[str]) -> list[str]:
        return self.predict(sources)


def baseline(name: str, data: str | Path) -> Baseline:
    """A baseline by name; `dictionary` learns from the train.jsonl beside `data` (or in it, a pairs directory)."""
    if name == "copy":
        return Baseline(name, copy_source)
    if name == "lead":
        return Baseline(name, lead)
    if name == "dictionary":
        data = Path(data)
        train = (data if data.is_dir() else data.parent) / "train.jsonl"
        if not train.is_file() or (data.is_file() and data.resolve() == train.resolve()):
            raise DataError(f"{data}: the dictionary baseline learns from the training pairs, expected in {train} "
                            "(the train split of `lmforge data pairs`) beside the test file")
        rows = load_pairs(train)
        return Baseline(name, WordDictionary.learn([r["source"] for r in rows], [r["target"] for r in rows]))
    raise ConfigError(f"baseline {name!r}: one of {', '.join(BASELINES)}")


# ---- one evaluation -----------------------------------------------------------------------------------


def model_predictor(lm: Any, task: str, *, num_beams: int | None, batch_size: int, max_new_tokens: int | None,
                    bar: Progress) -> Predictor:
    """The model's `translate` (an encoder-decoder: source in, target out, batched), or for summarization an
    LM's `summarize` (a decoder prompted to summarize)."""
    options = {k: v for k, v in (("num_beams", num_beams), ("max_new_tokens", max_new_tokens)) if v is not None}
    method = getattr(lm, "translate", None)
    if task == "summarization" and not _is_seq2seq(lm):
        method = getattr(lm, "summarize", None)
    if method is None:
        raise ConfigError(f"--task {task} needs an encoder-decoder model (or, for summarization, a model with "
                          f"`summarize`); {type(lm).__name__} has neither")

    def predict(sources: list[str]) -> list[str]:
        outputs = []
        for start in range(0, len(sources), batch_size):
            chunk = sources[start:start + batch_size]
            result = method(chunk, **options)
            outputs += [result] if isinstance(result, str) else list(result)
            bar.update(len(outputs))
        return outputs

    return predict


def _is_seq2seq(lm: Any) -> bool:
    return getattr(getattr(lm, "config", None), "is_encoder_decoder", False) or \
        type(getattr(lm, "model", None)).__name__ == "Seq2Seq"


def evaluate_pairs(model: Any, data: str | Path, task: str, *, num_beams: int | None = None, batch_size: int = 16,
                   max_new_tokens: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Every number of one translation / summarization evaluation: metrics, signatures and each example.

    `model` is a baseline name, a callable from sources to outputs, or a loaded LM; `data` a JSONL (TSV, ...)
    of {"source", "target"} rows, or a pairs directory (its test.jsonl).
    """
    if task not in TASKS:
        raise ConfigError(f"--task {task!r}: one of {', '.join(TASKS)}")
    path = split_file(data, "test")
    rows = load_pairs(path)
    sources, references = [r["source"] for r in rows], [r["target"] for r in rows]
    bar = Progress(len(rows), task, unit="examples", enabled=progress)
    if isinstance(model, str) and model in BASELINES:
        model = baseline(model, data)
    if isinstance(model, Baseline):
        predict, label = model, f"baseline:{model.name}"
    elif callable(model) and not hasattr(model, "tokenizer"):
        predict, label = model, getattr(model, "__name__", type(model).__name__)
    else:
        predict = model_predictor(model, task, num_beams=num_beams, batch_size=batch_size,
                                  max_new_tokens=max_new_tokens, bar=bar)
        label = "model"
    predictions = [p.strip() for p in predict(sources)]
    bar.update(len(rows))
    bar.close()
    values, signatures = scores(task, predictions, references)
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    if progress:
        for name, signature in signatures.items():
            print(f"{task} {name} = {values[name]:.2f}  ({signature})", file=sys.stderr)
    return {"kind": task, "data": str(Path(path).resolve()), "data_sha256": digest, "examples": len(rows),
            "predictor": label, **({"num_beams": num_beams} if num_beams is not None else {}),
            "metrics": values, "signatures": signatures,
            "details": [{"line": r.get("line"), "source": s, "reference": t, "prediction": p}
                        for r, s, t, p in zip(rows, sources, references, predictions)]}
