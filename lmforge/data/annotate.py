"""Labelled data: the formats lmforge trains on, `validate`, rule/model pre-labelling and review merging.

Formats (one JSON object per line):
    classification  {"text": str, "label": str | int}
    pairs           {"source": str, "target": str}                      translation, summarisation
    qa              {"context": str, "question": str, "answers": [str, ...]}
    chat            {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}

Pre-labelling is the human-in-the-loop shortcut: a predictor labels everything, people review only the
rows it is unsure of (a CSV a spreadsheet opens), and `merge_labels` folds their answers back, refusing a
row whose text changed since, because then the label may no longer belong to it.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

from lmforge.data.readers import Skip, read_rows
from lmforge.errors import ConfigError, DataError
from lmforge.io import atomic_path, check_output

Schema = Literal["classification", "pairs", "qa", "chat"]
_ROLES = {"system", "user", "assistant", "tool"}


class Predictor(Protocol):
    """Anything that labels texts: `predict(texts) -> [(label, confidence in [0, 1]), ...]`."""

    def __call__(self, texts: Sequence[str]) -> list[tuple[str, float]]: ...


def head_run_predictor(path: Path) -> Predictor | None:
    """A `finetune classify` run, loaded once: its most probable label and that label's probability."""
    # Imported here: only a head run needs torch and the model code, and `lmforge.data` must load without them.
    import torch

    from lmforge.checkpoint import HEAD_CONFIG, load_model
    from lmforge.model.heads import predict_texts

    if not (Path(path) / HEAD_CONFIG).is_file():
        return None
    loaded = load_model(path, device="cuda" if torch.cuda.is_available() else "cpu")
    head = loaded.model.config
    if head.task != "classify":
        raise ConfigError(f"{path}: a {head.task!r} head predicts numbers, not labels; "
                          "annotation needs a `finetune classify` run")

    def predict(texts: Sequence[str]) -> list[tuple[str, float]]:
        probs = predict_texts(loaded.model, loaded.tokenizer, list(texts)).softmax(-1)
        best = probs.argmax(-1).tolist()
        return [(head.labels[k], float(row[k])) for k, row in zip(best, probs)]

    return predict


# Loaders for `annotate --model DIR`: each takes a directory and returns a Predictor, or None if the
# directory is not its kind.
PREDICTOR_LOADERS: list[Callable[[Path], Predictor | None]] = [head_run_predictor]


def _is_str(v: Any) -> bool:
    return isinstance(v, str) and bool(v.strip())


def check_row(row: Any, schema: Schema) -> str | None:
    """Why `row` does not fit `schema`, or None."""
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    if schema == "classification":
        if not _is_str(row.get("text")):
            return "field 'text' missing or not a non-empty string"
        if not isinstance(row.get("label"), (str, int)) or isinstance(row.get("label"), bool) or row["label"] == "":
            return "field 'label' missing or not a string/integer"
    elif schema == "pairs":
        for key in ("source", "target"):
            if not _is_str(row.get(key)):
                return f"field {key!r} missing or not a non-empty string"
    elif schema == "qa":
        for key in ("context", "question"):
            if not _is_str(row.get(key)):
                return f"field {key!r} missing or not a non-empty string"
        answers = row.get("answers")
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
            return "field 'answers' must be a non-empty list of strings"
    elif schema == "chat":
        msgs = row.get("messages")
        if not isinstance(msgs, list) or not msgs:
            return "field 'messages' must be a non-empty list"
        for k, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
                return f"messages[{k}] must be {{'role': one of {sorted(_ROLES)}, 'content': str}}"
        if not any(m["role"] == "assistant" for m in msgs):
            return "no 'assistant' message to learn from"
    else:
        raise ConfigError(f"unknown schema {schema!r}; choose classification, pairs, qa or chat")
    return None


def validate(data: Path, schema: Schema = "classification", *, max_listed: int = 100) -> dict[str, Any]:
    """Check a labelled JSONL, CSV/TSV or Parquet file against a format; report every bad line and the class
    balance.

    Prints the bad lines (file:line: why) and, for classification, a class-balance table, then raises
    an error naming the number of bad lines if there are any, so scripts can stop on it.

    Args:
        data: The file (JSONL, CSV/TSV or Parquet, optionally .gz/.zst; CSV values are text, so a CSV
            fits "classification" only).
        schema: "classification", "pairs", "qa" or "chat" (see lmforge/data/annotate.py).
        max_listed: Print at most this many bad lines (all are counted).

    Returns:
        {"rows", "bad": [{"line", "error"}], "labels": {label: count}}.
    """
    path = Path(data)
    bad: list[dict[str, Any]] = []
    labels: Counter = Counter()
    rows = 0
    for line_no, row in read_rows(path, on_error="skip"):
        rows += 1
        err = row.detail if isinstance(row, Skip) else check_row(row, schema)
        if err:
            bad.append({"line": line_no, "error": err})
        elif schema == "classification":
            labels[str(row["label"])] += 1
    if rows == 0:
        raise DataError(f"{path}: no rows")
    report = {"file": str(path), "schema": schema, "rows": rows, "bad": bad, "labels": dict(labels.most_common())}
    for b in bad[:max_listed]:
        print(f"{path}:{b['line']}: {b['error']}", file=sys.stderr)
    if labels:
        print(balance_table(labels), file=sys.stderr)
    if bad:
        raise DataError(f"{path}: {len(bad)} of {rows} lines do not fit the {schema!r} format "
                        f"(first: line {bad[0]['line']}: {bad[0]['error']})")
    return report


def balance_table(labels: Counter) -> str:
    """A Markdown table of label counts and shares, most frequent first."""
    total = sum(labels.values())
    lines = ["| label | rows | share |", "|---|---:|---:|"]
    lines += [f"| {k} | {v:,} | {100 * v / total:.1f}% |" for k, v in labels.most_common()]
    return "\n".join(lines)


class RulePredictor:
    """Keyword and regex rules from a YAML/JSON file; a text gets the label with the most rule hits.

    File format: `{"labels": {"sports": {"keywords": ["match", "goal"], "regex": ["\\bscore[ds]?\\b"]}, ...},
    "default": "other"}`. Confidence is the winner's share of all hits (1.0 when only one label fires);
    a text no rule fires on gets `default` (or nothing) with confidence 0, so it always goes to review.
    """

    def __init__(self, rules: dict[str, Any], source: str = "rules") -> None:
        if not isinstance(rules, dict) or not isinstance(rules.get("labels"), dict) or not rules["labels"]:
            raise ConfigError(f"{source}: expected {{'labels': {{label: {{'keywords': [...], 'regex': [...]}}}}}}")
        self.default = rules.get("default")
        self.patterns: dict[str, list[re.Pattern]] = {}
        for label, spec in rules["labels"].items():
            spec = spec or {}
            pats = [re.compile(r"(?<!\w)" + re.escape(k.lower()) + r"(?!\w)") for k in spec.get("keywords", [])]
            for r in spec.get("regex", []):
                try:
                    pats.append(re.compile(r, re.IGNORECASE))
                except re.error as e:
                    raise ConfigError(f"{source}: label {label!r}: bad regex {r!r} ({e})") from None
            self.patterns[str(label)] = pats

    @classmethod
    def load(cls, path: Path) -> RulePredictor:
        import yaml

        try:
            rules = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"{path}: cannot read the rule file ({e})") from None
        return cls(rules, str(path))

    def __call__(self, texts: Sequence[str]) -> list[tuple[str, float]]:
        out = []
        for text in texts:
            low = text.lower()
            hits = {label: sum(len(p.findall(low)) for p in pats) for label, pats in self.patterns.items()}
            total = sum(hits.values())
            if total == 0:
                out.append((self.default or "", 0.0))
                continue
            label = max(hits, key=lambda k: hits[k])
            out.append((label, hits[label] / total))
        return out


def load_predictor(model: Path) -> Predictor:
    """A rule file (.yaml/.yml/.json), or a model directory some loader in `PREDICTOR_LOADERS` accepts."""
    model = Path(model)
    if model.is_file():
        return RulePredictor.load(model)
    if model.is_dir():
        for loader in PREDICTOR_LOADERS:
            if (predictor := loader(model)) is not None:
                return predictor
        raise ConfigError(f"{model}: no classifier loader accepts this directory; pass a keyword/regex rule file "
                          "(see `lmforge data annotate --help`) until a classifier is fine-tuned")
    raise ConfigError(f"{model}: no such file or directory")


def annotate(data: Path, model: Path, out: Path, *, review_below: float = 0.7, review: Path | None = None,
             text_field: str = "text", batch_size: int = 256, overwrite: bool = False,
             predictor: Predictor | None = None) -> dict[str, Any]:
    """Pre-label unlabeled JSONL with a classifier or keyword/regex rules; send unsure rows to review.

    Each output row gets `label`, `confidence` and `row` (its line number in `input`, the key that
    `merge-labels` matches on). Rows with confidence below `review_below` also go to a CSV
    (row, text, label, confidence) for people to correct in a spreadsheet.

    Args:
        data: Unlabeled rows with a text field: JSONL, or CSV/TSV/Parquet (optionally .gz/.zst).
        model: A rule file (YAML/JSON: labels → keywords / regex) or a trained classifier directory.
        out: Pre-labelled JSONL; refused if it exists (a review may be in progress), unless `overwrite`.
        review_below: Confidence under which a row is sent to review.
        review: The review CSV; default: `out` with the suffix .review.csv.
        text_field: Key of the text in each row.
        batch_size: Texts per predictor call.
        overwrite: Replace `out` and the review CSV.
        predictor: (Python only) a callable used instead of `model`.

    Returns:
        Counts of rows, rows sent to review and labels.
    """
    input, output = Path(data), Path(out)
    review = Path(review) if review is not None else output.with_suffix(".review.csv")
    check_output(output, overwrite)
    check_output(review, overwrite, option="--review")
    predict = predictor if predictor is not None else load_predictor(model)
    labels: Counter = Counter()
    rows = to_review = 0
    with atomic_path(output) as tmp_out, atomic_path(review) as tmp_rev, \
            open(tmp_out, "w", encoding="utf-8") as sink, open(tmp_rev, "w", encoding="utf-8", newline="") as rev:
        writer = csv.writer(rev)
        writer.writerow(["row", "text", "label", "confidence"])
        batch: list[tuple[int, dict]] = []

        def flush() -> None:
            nonlocal rows, to_review
            preds = predict([r[text_field] for _, r in batch])
            if len(preds) != len(batch):
                raise DataError(f"predictor returned {len(preds)} labels for {len(batch)} texts")
            for (line_no, row), (label, conf) in zip(batch, preds):
                row.update(row=line_no, label=label, confidence=round(float(conf), 4))
                sink.write(json.dumps(row, ensure_ascii=False) + "\n")
                labels[label] += 1
                rows += 1
                if conf < review_below:
                    writer.writerow([line_no, row[text_field], label, row["confidence"]])
                    to_review += 1
            batch.clear()

        for line_no, row in read_rows(input):
            if not isinstance(row.get(text_field), str):
                raise DataError(f"{input}:{line_no}: field {text_field!r} missing or not a string")
            batch.append((line_no, row))
            if len(batch) >= batch_size:
                flush()
        if batch:
            flush()
    if rows == 0:
        raise DataError(f"{input}: no rows")
    return {"output": str(output), "review": str(review), "rows": rows, "to_review": to_review,
            "labels": dict(labels.most_common())}


def merge_labels(prelabeled: Path, reviewed: Path, out: Path, *, text_field: str = "text",
                 on_mismatch: Literal["raise", "skip"] = "raise", overwrite: bool = False) -> dict[str, Any]:
    """Fold a reviewed CSV (row, text, label[, confidence]) back into pre-labelled JSONL.

    A reviewed label replaces the predicted one (confidence 1.0, `reviewed: true`) only if the row's
    text is unchanged; a row whose text differs is refused: an error naming the CSV line, or with
    `on_mismatch skip`, left as predicted and counted.

    Args:
        prelabeled: The JSONL written by `data annotate`.
        reviewed: The review CSV after people corrected the `label` column.
        out: The merged JSONL (classification format plus `confidence` and `reviewed`); refused if it
            exists, unless `overwrite`.
        text_field: Key of the text in the JSONL rows.
        on_mismatch: "raise" on the first changed text, or "skip" such rows.
        overwrite: Replace `out`.

    Returns:
        Counts of rows, merged, changed labels and refused rows.
    """
    output = Path(out)
    check_output(output, overwrite)
    reviewed_rows: dict[int, tuple[int, str, str]] = {}
    for csv_line, rec in read_rows(reviewed):
        missing = {"row", "text", "label"} - set(rec)
        if missing:
            raise DataError(f"{reviewed}:1: columns {sorted(missing)} missing (found {list(rec)})")
        try:
            reviewed_rows[int(rec["row"])] = (csv_line, rec["text"], str(rec["label"]).strip())
        except (TypeError, ValueError):
            raise DataError(f"{reviewed}:{csv_line}: 'row' must be an integer, got {rec['row']!r}") from None
    merged = changed = refused = rows = 0
    with atomic_path(output) as tmp, open(tmp, "w", encoding="utf-8") as sink:
        for line_no, row in read_rows(prelabeled):
            rows += 1
            key = row.get("row", line_no)
            if key in reviewed_rows:
                csv_line, text, label = reviewed_rows.pop(key)
                if text != row.get(text_field):
                    if on_mismatch == "raise":
                        raise DataError(f"{reviewed}:{csv_line}: text of row {key} differs from {prelabeled}:"
                                        f"{line_no}; refusing its label (pass --on-mismatch skip to leave it)")
                    refused += 1
                elif label:
                    changed += label != row.get("label")
                    row.update(label=label, confidence=1.0, reviewed=True)
                    merged += 1
            sink.write(json.dumps(row, ensure_ascii=False) + "\n")
        if reviewed_rows:  # raised inside the `with`, so no output file is left behind
            k, (csv_line, _, _) = next(iter(reviewed_rows.items()))
            raise DataError(f"{reviewed}:{csv_line}: row {k} is not in {prelabeled} "
                            f"({len(reviewed_rows)} such rows)")
    return {"output": str(output), "rows": rows, "merged": merged, "changed": changed, "refused": refused}
