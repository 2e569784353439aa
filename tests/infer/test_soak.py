"""Server hardening: a body limit, prompts refused from their length before they are tokenized whole (and
tokenized off the event loop), bad JSON explained, per-key concurrency and request timeouts, /tokenize for
the chat page; and a few seconds of benchmarks/soak.py: streams plus hostile requests, no 5xx."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.client import HTTPConnection
from pathlib import Path

import pytest
from conftest import running_server

from lmforge.infer.server import create_app
from lmforge.lm import LM

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import soak  # benchmarks/ is not a package

CONTEXT = 64


def exchange(url: str, path: str, body: bytes | dict, headers: dict | None = None) -> tuple[int, dict]:
    conn = HTTPConnection(url.removeprefix("http://"), timeout=60)
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    conn.request("POST", path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    raw = response.read()
    conn.close()
    return response.status, json.loads(raw) if raw else {}


@pytest.fixture(scope="module")
def lm(make_lm: Callable[..., LM]) -> LM:
    return make_lm("gpt2-tiny", max_position_embeddings=CONTEXT)


@pytest.fixture(scope="module")
def app(lm: LM):
    return create_app(lm, name="tiny", max_batch=4, max_request_bytes=100_000)


@pytest.fixture(scope="module")
def url(app) -> Iterator[str]:
    with running_server(app) as base:
        yield base


def test_a_body_over_the_limit_is_413_declared_or_chunked(url: str) -> None:
    status, body = exchange(url, "/v1/completions", {"model": "tiny", "prompt": "x" * 200_000})
    assert status == 413 and body["error"]["code"] == "request_too_large"
    assert "100,000 bytes" in body["error"]["message"] and "--max-request-bytes" in body["error"]["message"]
    conn = HTTPConnection(url.removeprefix("http://"), timeout=60)
    conn.request("POST", "/v1/completions", body=iter([b'{"model": "tiny", "prompt": "'] + [b"x" * 50_000] * 4),
                 headers={"Content-Type": "application/json"}, encode_chunked=True)
    assert conn.getresponse().status == 413
    conn.close()


def test_bad_json_says_what_is_wrong_in_words(url: str) -> None:
    status, body = exchange(url, "/v1/completions", b'{"model": "tiny", "prompt": "hi",')
    message = body["error"]["message"]
    assert status == 400 and "not valid JSON" in message and "at character" in message
    assert "JSON decode error" not in message


def test_a_long_prompt_is_refused_without_tokenizing_it_whole(url: str, app, monkeypatch) -> None:
    """Against a 64-token context: a prompt longer than 65 x the longest token is refused untokenized; a
    shorter one that still cannot fit is refused from its first 8 x 64 characters. Tokenizing happens on the
    tokenizer pool's threads, never on the event loop."""
    svc = app.state.service
    seen: list[tuple[int, str]] = []
    encode = svc.tokenizer.encode

    def recording(text: str, **kwargs):
        seen.append((len(text), threading.current_thread().name))
        return encode(text, **kwargs)

    monkeypatch.setattr(svc.tokenizer, "encode", recording)
    bound = (CONTEXT + 1) * svc.max_token_chars
    assert 8 * CONTEXT < bound - 8 < 90_000
    for path, text in (("/v1/completions", "x" * 90_000), ("/v1/completions", "the cat " * ((bound - 8) // 8)),
                       ("/v1/chat/completions", "the cat " * ((bound - 8) // 8 - 20))):
        body = {"prompt": text} if "chat" not in path else {"messages": [{"role": "user", "content": text}]}
        status, answer = exchange(url, path, {"model": "tiny", "max_tokens": 2, **body})
        assert status == 400 and answer["error"]["code"] == "context_length_exceeded", answer
        if text.startswith("x"):
            assert not seen and f"{len(text):,} characters" in answer["error"]["message"]
    assert seen and max(n for n, _ in seen) <= 8 * CONTEXT
    seen.clear()
    assert exchange(url, "/v1/completions", {"model": "tiny", "prompt": "the cat", "max_tokens": 2})[0] == 200
    assert seen and all(name.startswith("lmforge-tokenize") for _, name in seen)


def test_memory_is_handed_back_after_a_large_body(lm: LM, monkeypatch: pytest.MonkeyPatch) -> None:
    """A prompt of megabytes, refused or not, leaves garbage that glibc would keep (RSS only growing, 8 GB
    after a 50 MB prompt): after any body over 1 MiB the server returns the freed pages (malloc_trim)."""
    import lmforge.infer.limits as limits

    trims: list[float] = []
    monkeypatch.setattr(limits, "trim_memory", lambda: trims.append(time.monotonic()))
    with running_server(create_app(lm, name="tiny")) as base:
        status, _ = exchange(base, "/v1/completions", {"model": "tiny", "prompt": "the cat " * 10_000, "max_tokens": 2})
        assert status == 400 and not trims  # 80 kB: nothing to hand back
        status, body = exchange(base, "/v1/completions", {"model": "tiny", "prompt": "the cat " * 300_000,
                                                          "max_tokens": 2})
        assert status == 400 and body["error"]["code"] == "context_length_exceeded"
        deadline = time.monotonic() + 10
        while not trims and time.monotonic() < deadline:  # it runs once the response is sent
            time.sleep(0.01)
        assert len(trims) == 1


def test_tokenize_counts_a_conversation_as_chat_renders_it(url: str, lm: LM) -> None:
    from lmforge.infer.text import chat_prompt

    messages = [{"role": "user", "content": "the cat sat"}]
    status, body = exchange(url, "/tokenize", {"model": "tiny", "messages": messages})
    prompt, _ = chat_prompt(lm.tokenizer, messages)
    assert status == 200 and body["tokens"] == lm.tokenizer.encode(prompt)
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == CONTEXT


def stream_open(url: str, body: dict) -> HTTPConnection:
    conn = HTTPConnection(url.removeprefix("http://"), timeout=60)
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: ")
    conn.response = response
    return conn


def test_per_key_concurrency_limit_is_429_until_a_request_ends(lm: LM) -> None:
    app = create_app(lm, name="tiny", max_concurrent_per_key=1)
    svc = app.state.service
    long = {"model": "tiny", "prompt": "a", "max_tokens": CONTEXT - 2, "ignore_eos": True, "stream": True}
    with running_server(app) as base:
        first = stream_open(base, long)
        status, body = exchange(base, "/v1/completions", {"model": "tiny", "prompt": "a", "max_tokens": 2})
        assert status == 429 and body["error"]["code"] == "concurrency_limit"
        first.response.read()  # let it finish
        first.close()
        deadline = time.monotonic() + 20
        while svc.in_flight and time.monotonic() < deadline:
            time.sleep(0.01)
        assert exchange(base, "/v1/completions", {"model": "tiny", "prompt": "a", "max_tokens": 2})[0] == 200
        assert not svc.in_flight


def test_a_request_past_the_timeout_is_cancelled_with_504(lm: LM) -> None:
    app = create_app(lm, name="tiny", request_timeout=0.001)
    with running_server(app) as base:
        body = {"model": "tiny", "prompt": "a", "max_tokens": CONTEXT - 2, "ignore_eos": True}
        status, answer = exchange(base, "/v1/completions", body)
        assert status == 504 and answer["error"]["code"] == "request_timeout"
        conn = HTTPConnection(base.removeprefix("http://"), timeout=60)
        conn.request("POST", "/v1/completions", body=json.dumps({**body, "stream": True}),
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200  # the stream had started: the timeout comes in-band
        events = [line for line in response.read().split(b"\n\n") if line]
        conn.close()
        assert b"request_timeout" in events[-2] and events[-1] == b"data: [DONE]"
        deadline = time.monotonic() + 20
        while app.state.service.engine.has_work and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not app.state.service.engine.has_work  # the timed-out requests were cancelled


def test_short_soak_has_no_5xx_and_every_hostile_request_is_4xx(lm: LM) -> None:
    """benchmarks/soak.py for 3 s: 4 streaming clients, 14 hostile requests (each kind twice), then a small
    request beside a 10 MB prompt, which the default body limit refuses unread."""
    import os

    with running_server(create_app(lm, name="bench", max_batch=4)) as base:
        port = int(base.rsplit(":", 1)[1])
        result = soak.soak(port, pid=os.getpid(), clients=4, seconds=3.0, hostile=14, max_tokens=8)
    assert result["streams"] > 0 and result["stream_errors"] == 0
    assert result["5xx"] == 0 and result["hostile"] == {"4xx": 14}, result["hostile_by_kind"]
    assert result["latency"]["big_prompt_status"] == [413] * 3
    assert "beside a 10 MB prompt" in soak.report(result, 4, 3.0)
