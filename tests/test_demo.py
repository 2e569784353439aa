"""`lmforge demo` end to end on a shrunken budget: every stage runs and the report tells the truth."""

from __future__ import annotations

import json
import re

import pytest

import lmforge


@pytest.mark.slow
def test_demo_runs_the_whole_chain_and_reports_lower_perplexity(tmp_path):
    """A short demo writes a report whose trained perplexity is well below the untrained one."""
    report = lmforge.demo(minutes=30, max_steps=60, out=tmp_path / "demo", model="gpt2-tiny", vocab_size=512,
                          corpus_mb=0.3, batch_size=8, lr=3e-3, lstm_model="lstm-tiny")
    out = tmp_path / "demo"
    text = report.read_text()
    untrained = float(re.search(r"\| untrained \| ([\d.]+) \|", text).group(1))
    trained = float(re.search(r"\| trained \| ([\d.]+) \|", text).group(1))
    assert trained < untrained / 3
    held_out = lmforge.load(out / "model").perplexity(out / "corpus" / "heldout", progress=False)
    assert f"{held_out['perplexity']:.2f}" == f"{trained:.2f}"  # the saved model's own held-out number
    # the baselines' rows: a counted 5-gram and a 60-step LSTM, both well below the untrained model
    ngram = float(re.search(r"\| 5-gram, modified Kneser-Ney \(counted in \d+ s\) \| ([\d.]+) \|", text).group(1))
    lstm = float(re.search(r"\| LSTM `lstm-tiny` \(60 steps, [\d.]+ min\) \| ([\d.]+) \|", text).group(1))
    assert ngram < untrained / 3 and lstm < untrained / 2
    assert (out / "loss.png").stat().st_size > 1000
    for name in ("config.json", "model.safetensors", "tokenizer.json", "metrics.jsonl", "generation_config.json"):
        assert (out / "model" / name).exists(), name
    meta = json.loads((out / "packed" / "meta.json").read_text())
    assert meta["tokens"]["val"] > 0
    assert text.count("```python") == 5  # four continuations and one fill-in-the-middle
    assert "<FILL> = " in text
    # the compression section: the trained model beside its int8 and int4 copies, each smaller
    sizes = [float(re.search(rf"\| {name} \| [^|]+ \| ([\d.]+) \|", text).group(1))
             for name in ("model", "model-int8", "model-int4")]
    assert sizes[0] > sizes[1] > sizes[2] and (out / "compress.png").exists()
    # the documents section: the shipped docs-qa retrieval scores, as `lmforge eval` gives them
    from lmforge.demo import DOCS_QA
    from lmforge.eval.evaluate import evaluate

    bm25 = evaluate(lmforge.load(out / "model"), [DOCS_QA / "retrieval" / "bm25.yaml"],
                    progress=False)["docs-qa-bm25"]
    assert "## Question answering over documents" in text
    assert f"| bm25 | {bm25['recall@1']:.3f} | {bm25['recall@5']:.3f} | {bm25['mrr']:.3f} |" in text
    assert bm25["recall@5"] > 0.9
