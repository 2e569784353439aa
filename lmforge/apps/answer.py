"""`lmforge answer`: answer a question from your documents, citing the chunks the answer came from.

Two readers over the same retrieval (`lmforge.data.index`):
  generative  the retrieved chunks are quoted under numbers ([1] file.md#3) in a chat prompt, rendered by the
              model's own chat template, and the model writes an answer citing them; generation runs through
              the model's one engine (`LM.chat`). The sources listed are the ones the answer cites, else all
              that were quoted.
  extractive  a BERT-style span head (`finetune qa`, or an HF BertForQuestionAnswering) reads each chunk and
              the best-scoring span over all of them is the answer, with the chunk it came from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from lmforge.checkpoint import HEAD_CONFIG, HF_SPAN_HEAD, load_model
from lmforge.config import read_config_json
from lmforge.data.index import Hit, Mode, cited_sources, quote_chunks
from lmforge.errors import ConfigError
from lmforge.infer.documents import open_index
from lmforge.lm import LM, load
from lmforge.methods.qa import predict_spans
from lmforge.model.heads import SpanHead


@dataclass
class Answer:
    """An answer and the chunks it rests on (`sources`: number, id, file, score, and whether it is cited)."""

    question: str
    answer: str
    sources: list[dict[str, Any]] = field(default_factory=list)
    reader: str = "generative"

    def to_dict(self) -> dict[str, Any]:
        return {"question": self.question, "answer": self.answer, "sources": self.sources, "reader": self.reader}

    def __str__(self) -> str:
        lines = [self.answer.strip() or "(no answer)", "", "Sources:"]
        lines += [f"[{s['n']}] {s['id']}" + ("" if s.get("cited", True) else " (quoted, not cited)")
                  for s in self.sources]
        return "\n".join(lines)


def generative_answer(lm: LM, question: str, hits: list[Hit], **sampling: Any) -> Answer:
    """The model's cited answer to `question` from the quoted `hits`."""
    text = lm.chat(quote_chunks(question, hits), **sampling)
    return Answer(question, text.strip(), cited_sources(text, hits), "generative")


def extractive_answer(net: SpanHead, tokenizer: Any, question: str, hits: list[Hit]) -> Answer:
    """The best span over all retrieved chunks, with the chunk it came from."""
    spans = predict_spans(net, tokenizer, question, [h.chunk.text for h in hits])
    if not spans:
        return Answer(question, "", [], "extractive")
    best = spans[0]
    hit = hits[best.context]
    source = {"n": best.context + 1, "id": hit.chunk.id, "source": hit.chunk.source, "score": hit.score,
              "cited": True, "span": [best.start, best.end], "span_score": best.score}
    return Answer(question, best.text, [source], "extractive")


def is_span_run(path: Path) -> bool:
    """A reader for extractive QA: a `finetune qa` run or a Hugging Face BertForQuestionAnswering directory."""
    path = Path(path)
    if (path / HEAD_CONFIG).is_file():
        return read_config_json(path / HEAD_CONFIG).get("task") == "qa"
    return (path / "config.json").is_file() and HF_SPAN_HEAD in read_config_json(path / "config.json").get(
        "architectures", [])


class Reader:
    """A loaded reader: a span head run (extractive) or a generative LM, told apart by the checkpoint's files."""

    def __init__(self, model: Path | LM, reader: Literal["generative", "extractive"] | None = None,
                 device: str | None = None) -> None:
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if isinstance(model, LM):
            self.kind, self.lm = "generative", model
            self.lm.require_decoder("answer questions")
            return
        span = is_span_run(Path(model))
        self.kind = reader or ("extractive" if span else "generative")
        if self.kind == "extractive":
            if not span:
                raise ConfigError(f"{model}: --reader extractive needs a span head: a `finetune qa` run or a "
                                  "Hugging Face BertForQuestionAnswering directory")
            loaded = load_model(Path(model), device=device)
            self.net, self.tokenizer = loaded.model, loaded.tokenizer
        elif self.kind == "generative":
            if span:
                raise ConfigError(f"{model}: is a span head, which reads spans and cannot write an answer; pass "
                                  "--reader extractive, or a decoder for a generative answer")
            self.lm = load(Path(model), device=device)
            self.lm.require_decoder("answer questions")
        else:
            raise ConfigError(f"reader={reader!r}: expected generative or extractive")

    def answer(self, question: str, hits: list[Hit], **sampling: Any) -> Answer:
        if self.kind == "extractive":
            return extractive_answer(self.net, self.tokenizer, question, hits)
        return generative_answer(self.lm, question, hits, **sampling)


def answer(
    question: str,
    index: Path = Path("idx"),
    model: Path | None = None,
    *,
    reader: Literal["generative", "extractive"] | None = None,
    k: int = 5,
    mode: Mode | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    device: str | None = None,
) -> Answer:
    """Answer a question from an index of documents, listing the chunks the answer rests on.

    Args:
        question: The question, in words.
        index: Directory written by `lmforge index`.
        model: A chat/generative model (its chat template quotes the sources), or for --reader extractive a
            `finetune qa` run or a Hugging Face BertForQuestionAnswering directory.
        reader: "generative" (the model writes a cited answer) or "extractive" (the best span of a chunk);
            default: extractive for a span-head checkpoint, else generative.
        k: Chunks retrieved and read.
        mode: Retrieval: "bm25", "dense" or "hybrid" (default hybrid when the index holds vectors).
        max_new_tokens: Longest generated answer.
        temperature: 0 answers greedily (reproducible); higher samples.
        device: "cpu", "cuda", ...; default CUDA when present.

    Returns:
        The answer and its sources ([n] file#chunk).
    """
    if model is None:
        raise ConfigError("--model is required: a chat model, or a span-head (QA) model with --reader extractive")
    docs = open_index(Path(index), device=device, dense=mode != "bm25")
    hits = docs.search(question, k, mode)
    if not hits:
        return Answer(question, "", [], reader or "generative")
    return Reader(Path(model), reader, device).answer(question, hits, max_new_tokens=max_new_tokens,
                                                      temperature=temperature)
