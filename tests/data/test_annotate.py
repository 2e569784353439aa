"""Labelled formats: validate every line, pre-label with rules or a plugged-in predictor, merge reviews."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest

from lmforge.cli import main
from lmforge.data.annotate import PREDICTOR_LOADERS, annotate, check_row, merge_labels, validate
from lmforge.errors import ConfigError, DataError

RULES = """
labels:
  sports: {keywords: [match, goal, team], regex: ['\\bscor(e|ed|ing)\\b']}
  cooking: {keywords: [recipe, oven, bake]}
default: other
"""


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


@pytest.mark.parametrize("schema, good, bad, problem", [
    ("classification", {"text": "t", "label": "a"}, {"text": "t"}, "field 'label' missing"),
    ("pairs", {"source": "s", "target": "t"}, {"source": "s", "target": ""}, "field 'target' missing"),
    ("qa", {"context": "c", "question": "q", "answers": ["a"]}, {"context": "c", "question": "q", "answers": "a"},
     "field 'answers' must be a non-empty list of strings"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
     {"messages": [{"role": "user", "content": "hi"}]}, "no 'assistant' message"),
])
def test_each_format_accepts_good_rows_and_names_the_problem_with_bad_ones(schema, good, bad, problem):
    assert check_row(good, schema) is None
    assert problem in check_row(bad, schema)
    assert check_row([good], schema) == "expected a JSON object, got list"


def test_validate_reports_every_bad_line_and_the_class_balance(tmp_path, capsys):
    p = _jsonl(tmp_path / "l.jsonl", [{"text": "a", "label": "pos"}, {"text": "b"}, "{oops",
                                       {"text": "c", "label": "neg"}, {"text": "d", "label": "pos"}, [1]])
    with pytest.raises(DataError, match=r"3 of 6 lines do not fit the 'classification' format \(first: line 2"):
        validate(p)
    err = capsys.readouterr().err
    for line in (2, 3, 6):
        assert f"l.jsonl:{line}:" in err
    assert "| pos | 2 | 66.7% |" in err and "| neg | 1 | 33.3% |" in err


def test_validate_cli_takes_the_file_as_a_positional_argument(tmp_path, capsys):
    p = _jsonl(tmp_path / "l.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": 0}])
    assert main(["data", "validate", str(p), "--schema", "classification"]) == 0
    assert json.loads(capsys.readouterr().out)["labels"] == {"1": 1, "0": 1}


def test_annotate_with_rules_writes_labels_and_a_review_csv(tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES, encoding="utf-8")
    texts = ["The team scored a late goal", "Bake the recipe in the oven", "The match recipe", "Nothing here"]
    src = _jsonl(tmp_path / "u.jsonl", [{"text": t} for t in texts])
    res = annotate(src, rules, tmp_path / "pre.jsonl", review_below=0.7)
    rows = [json.loads(line) for line in (tmp_path / "pre.jsonl").read_text().splitlines()]
    assert [(r["label"], r["confidence"]) for r in rows] == [("sports", 1.0), ("cooking", 1.0), ("sports", 0.5),
                                                             ("other", 0.0)]
    with open(tmp_path / "pre.review.csv", newline="") as f:
        review = list(csv.DictReader(f))
    assert [r["row"] for r in review] == ["3", "4"] and res["to_review"] == 2


def test_a_trained_classifier_plugs_in_as_a_predict_callable(tmp_path, monkeypatch):
    src = _jsonl(tmp_path / "u.jsonl", [{"text": "good"}, {"text": "bad"}])

    def predict(texts):
        return [("pos" if "good" in t else "neg", 0.9) for t in texts]

    annotate(src, None, tmp_path / "a.jsonl", predictor=predict)
    assert [json.loads(x)["label"] for x in (tmp_path / "a.jsonl").read_text().splitlines()] == ["pos", "neg"]
    ckpt = tmp_path / "runs" / "clf"
    ckpt.mkdir(parents=True)
    with pytest.raises(ConfigError, match="no classifier loader accepts"):
        annotate(src, ckpt, tmp_path / "b.jsonl")
    monkeypatch.setattr(sys.modules["lmforge.data.annotate"], "PREDICTOR_LOADERS",
                        [lambda d: predict if d == ckpt else None])
    assert annotate(src, ckpt, tmp_path / "b.jsonl")["labels"] == {"pos": 1, "neg": 1}
    assert len(PREDICTOR_LOADERS) == 1  # the real registry is untouched by the test


def test_a_finetune_classify_run_prelabels_with_its_predictions(make_checkpoint, tmp_path, monkeypatch):
    """`annotate --model runs/clf` labels each row as `lmforge predict` does, with that label's probability,
    loading the run once and writing no temporary files."""
    import tempfile

    import lmforge.checkpoint
    from lmforge.methods.classify import finetune_classify, predict

    rows = [{"text": t, "label": lab} for t, lab in [("a lovely warm film", "pos"), ("dull and far too long", "neg"),
                                                     ("a joy to watch", "pos"), ("I walked out bored", "neg")] * 3]
    train = _jsonl(tmp_path / "train.jsonl", rows)
    base = make_checkpoint("gpt2-tiny", out=tmp_path / "base", max_position_embeddings=64)
    run = finetune_classify(base, train, tmp_path / "clf", max_steps=2, batch_size=4, warmup_steps=1,
                            precision="32", progress=False)
    src = _jsonl(tmp_path / "u.jsonl", [{"text": r["text"]} for r in rows[:6]])
    predict(run, src, tmp_path / "p.jsonl")
    expected = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]

    loads = []
    real_load = lmforge.checkpoint.load_model
    monkeypatch.setattr(lmforge.checkpoint, "load_model", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    for name in ("mkstemp", "mkdtemp", "NamedTemporaryFile", "TemporaryDirectory"):
        monkeypatch.setattr(tempfile, name, lambda *a, _name=name, **k: pytest.fail(f"tempfile.{_name} called"))
    assert main(["data", "annotate", "--input", str(src), "--model", str(run), "--output", str(tmp_path / "a.jsonl"),
                 "--review-below", "1.01", "--batch-size", "4"]) == 0
    assert len(loads) == 1 and not any(scratch.iterdir())  # two batches, one load, no temporary files
    labelled = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert [r["label"] for r in labelled] == [e["label"] for e in expected]
    assert [r["confidence"] for r in labelled] == pytest.approx(  # annotate keeps 4 decimals
        [e["probabilities"][e["label"]] for e in expected], abs=1e-4)
    assert len((tmp_path / "a.review.csv").read_text().splitlines()) == 7  # every row is below 1.01


def test_a_regression_run_cannot_annotate(tmp_path, monkeypatch):
    """A regress head predicts numbers, not labels: refused by name before any text is scored."""
    from types import SimpleNamespace

    import lmforge.checkpoint
    from lmforge.model.heads import HeadConfig

    run = tmp_path / "reg"
    run.mkdir()
    (run / lmforge.checkpoint.HEAD_CONFIG).write_text("{}")
    loaded = SimpleNamespace(model=SimpleNamespace(config=HeadConfig(task="regress")))
    monkeypatch.setattr(lmforge.checkpoint, "load_model", lambda *a, **k: loaded)
    src = _jsonl(tmp_path / "u.jsonl", [{"text": "x"}])
    with pytest.raises(ConfigError, match="'regress' head predicts numbers"):
        annotate(src, run, tmp_path / "a.jsonl")


def _review(tmp_path: Path, rows: list[list]) -> Path:
    p = tmp_path / "reviewed.csv"
    with open(p, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["row", "text", "label", "confidence"], *rows])
    return p


def test_merge_labels_folds_reviews_back_and_refuses_changed_text(tmp_path):
    pre = _jsonl(tmp_path / "pre.jsonl", [{"text": "a", "label": "x", "confidence": 0.4, "row": 1},
                                          {"text": "b", "label": "y", "confidence": 0.9, "row": 2},
                                          {"text": "c", "label": "x", "confidence": 0.2, "row": 3}])
    good = _review(tmp_path, [[1, "a", "y", 0.4], [3, "c", "x", 0.2]])
    res = merge_labels(pre, good, tmp_path / "out.jsonl")
    assert (res["merged"], res["changed"], res["refused"]) == (2, 1, 0)
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert out[0] == {"text": "a", "label": "y", "confidence": 1.0, "row": 1, "reviewed": True}
    assert "reviewed" not in out[1]
    changed = _review(tmp_path, [[1, "a edited", "y", 0.4]])
    with pytest.raises(DataError, match=r"reviewed\.csv:2: text of row 1 differs"):
        merge_labels(pre, changed, tmp_path / "refused.jsonl")
    assert not (tmp_path / "refused.jsonl").exists()
    assert merge_labels(pre, changed, tmp_path / "skip.jsonl", on_mismatch="skip")["refused"] == 1


def test_merge_labels_cli_takes_both_files_positionally(tmp_path, capsys):
    pre = _jsonl(tmp_path / "pre.jsonl", [{"text": "a", "label": "x", "row": 1}])
    rev = _review(tmp_path, [[1, "a", "z", 0.1]])
    assert main(["data", "merge-labels", str(pre), str(rev), "--output", str(tmp_path / "o.jsonl")]) == 0
    assert json.loads(capsys.readouterr().out)["changed"] == 1
