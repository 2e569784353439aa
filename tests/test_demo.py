"""`lmforge demo` end to end on a shrunken budget: every stage runs and the report tells the truth."""

from __future__ import annotations

import json
import re

import lmforge


def test_demo_runs_the_whole_chain_and_reports_lower_perplexity(tmp_path):
    """A short demo writes a report whose trained perplexity is well below the untrained one."""
    report = lmforge.demo(minutes=30, max_steps=60, out=tmp_path / "demo", model="gpt2-tiny", vocab_size=512,
                          corpus_mb=0.3, batch_size=8, lr=3e-3)
    out = tmp_path / "demo"
    text = report.read_text()
    untrained = float(re.search(r"\| untrained \| ([\d.]+) \|", text).group(1))
    trained = float(re.search(r"\| trained \| ([\d.]+) \|", text).group(1))
    assert trained < untrained / 3
    assert (out / "loss.png").stat().st_size > 1000
    for name in ("config.json", "model.safetensors", "tokenizer.json", "metrics.jsonl", "generation_config.json"):
        assert (out / "model" / name).exists(), name
    meta = json.loads((out / "packed" / "meta.json").read_text())
    assert meta["tokens"]["val"] > 0
    assert text.count("```python") == 4
