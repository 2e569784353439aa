"""The OpenAI-compatible server, driven by the official `openai` client against a tiny model on loopback."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from http.client import HTTPConnection

import openai
import pytest
import torch
import torch.nn.functional as F
from conftest import running_server

from lmforge.infer.decode import generate_tokens
from lmforge.infer.server import create_app
from lmforge.lm import LM


def exchange(method: str, url: str, body: bytes | dict | None = None) -> tuple[int, dict[str, str], bytes]:
    """A plain HTTP exchange (stdlib), for what the openai client hides: status, headers, raw body."""
    host, path = url.removeprefix("http://").split("/", 1)
    conn = HTTPConnection(host, timeout=60)
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    conn.request(method, "/" + path, body=data, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    result = response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    conn.close()
    return result


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "the cat sat on the mat"}]


@pytest.fixture(scope="module")
def lm(make_lm: Callable[..., LM]) -> LM:
    return make_lm("gpt2-tiny")


@pytest.fixture(scope="module")
def url(lm: LM) -> Iterator[str]:
    with running_server(create_app(lm, name="tiny", max_batch=4)) as base:
        yield base


@pytest.fixture(scope="module")
def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_lists_the_served_model(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_chat_completion_equals_the_python_api(client: openai.OpenAI, lm: LM) -> None:
    """A greedy chat reply over HTTP is exactly LM.chat's reply: both decode through the same engine."""
    reply = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=0)
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == lm.chat(MESSAGES, max_new_tokens=12, temperature=0, stop_at_eos=True)
    assert reply.usage.prompt_tokens == len(lm.tokenizer.encode(lm.tokenizer.apply_chat_template(MESSAGES)))
    assert choice.finish_reason == ("length" if reply.usage.completion_tokens == 12 else "stop")


def test_seeded_completion_equals_the_python_api(client: openai.OpenAI, lm: LM) -> None:
    reply = client.completions.create(model="tiny", prompt="The model learns to", max_tokens=10, seed=5)
    assert reply.choices[0].text == lm.generate("The model learns to", max_new_tokens=10, seed=5, temperature=1.0)
    assert reply.usage.completion_tokens == len(generated_tokens(lm, "The model learns to", max_new_tokens=10,
                                                                 seed=5, temperature=1.0))


def test_streamed_chat_joins_to_the_unstreamed_reply(client: openai.OpenAI) -> None:
    kwargs = dict(model="tiny", messages=MESSAGES, max_tokens=16, temperature=0)
    whole = client.chat.completions.create(**kwargs).choices[0]
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1
    assert "".join(pieces) == whole.message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == whole.finish_reason


def generated_tokens(lm: LM, prompt: str, **sampling: object) -> list[int]:
    """The token ids LM.generate decodes for `prompt` (without the end-of-sequence token), for usage counts."""
    return list(generate_tokens(lm.model, lm.tokenizer.encode(prompt), lm.sampling(**sampling),
                                eos_id=lm.tokenizer.eos_id))


def test_streamed_completion_with_usage(client: openai.OpenAI, lm: LM) -> None:
    """The streamed pieces join to the unstreamed text; the last chunk's usage counts the prompt's tokens and
    the generated ones."""
    kwargs = dict(model="tiny", prompt="The model learns to", max_tokens=12, temperature=0)
    whole = client.completions.create(**kwargs).choices[0].text
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    tokens = generated_tokens(lm, "The model learns to", max_new_tokens=12, temperature=0)
    assert lm.tokenizer.decode(tokens, skip_special_tokens=True) == whole
    usage = chunks[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(lm.tokenizer.encode("The model learns to")),
                                                              len(tokens))


def test_echo_logprobs_score_the_prompt_like_a_forward_pass(client: openai.OpenAI, lm: LM) -> None:
    """What lm-evaluation-harness's local-completions sends for loglikelihood: token ids, echo, logprobs,
    max_tokens 0. The prompt's token logprobs equal log_softmax of one forward; the first is None."""
    ids = lm.tokenizer.encode("The cat sat on the mat.")
    reply = client.completions.create(model="tiny", prompt=ids, max_tokens=0, echo=True, logprobs=1, temperature=0)
    lp = reply.choices[0].logprobs
    with torch.no_grad():
        logp = F.log_softmax(lm.model(torch.tensor([ids])).double(), dim=-1)[0]
    assert lp.token_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx([logp[i - 1, ids[i]].item() for i in range(1, len(ids))],
                                                  abs=1e-4)
    assert len(lp.tokens) == len(ids) and len(lp.top_logprobs) == len(ids)
    assert reply.choices[0].text == lm.tokenizer.decode(ids)


def test_generated_logprobs_come_with_top_alternatives(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4, temperature=0,
                                           logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert content and all(len(t.top_logprobs) == 3 for t in content)
    assert all(t.logprob == pytest.approx(t.top_logprobs[0].logprob) for t in content)  # greedy = most likely


@pytest.mark.parametrize("kwargs, error", [
    ({"model": "nope"}, openai.NotFoundError),
    ({"max_tokens": -1}, openai.BadRequestError),
    ({"max_tokens": 10**9}, openai.BadRequestError),
    ({"temperature": "hot"}, openai.BadRequestError),
    ({"messages": []}, openai.BadRequestError),
    ({"messages": [{"role": "user", "content": "the cat " * 300}]}, openai.BadRequestError),
])
def test_bad_requests_get_openai_errors(client: openai.OpenAI, kwargs: dict, error: type) -> None:
    """Unknown model → 404; wrong types, bad ranges and over-long prompts → 400; never a 500."""
    with pytest.raises(error) as caught:
        client.chat.completions.create(**{"model": "tiny", "messages": MESSAGES, "max_tokens": 4, **kwargs})
    assert caught.value.body["message"]


def test_malformed_json_is_a_400_with_an_error_body(url: str) -> None:
    status, _, body = exchange("POST", f"{url}/v1/completions", b"{not json")
    assert status == 400
    assert json.loads(body)["error"]["type"] == "invalid_request_error"


def test_health_and_metrics(client: openai.OpenAI, url: str) -> None:
    client.completions.create(model="tiny", prompt="a", max_tokens=2)
    assert json.loads(exchange("GET", f"{url}/health")[2])["status"] == "ok"
    text = exchange("GET", f"{url}/metrics")[2].decode()
    assert 'lmforge_requests_total{endpoint="/v1/completions",status="200"}' in text
    for name in ("lmforge_queue_depth", "lmforge_time_to_first_token_seconds_bucket",
                 "lmforge_inter_token_latency_seconds_count", "lmforge_generation_tokens_total"):
        assert name in text


def test_api_key_is_required_when_set(lm: LM) -> None:
    with running_server(create_app(lm, name="tiny", api_key="sekret")) as base:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0).models.list()
        models = openai.OpenAI(base_url=f"{base}/v1", api_key="sekret", max_retries=0).models.list()
        assert [m.id for m in models.data] == ["tiny"]


def test_full_queue_answers_429_with_retry_after(lm: LM) -> None:
    with running_server(create_app(lm, name="tiny", max_queue=0)) as base:
        body = {"model": "tiny", "prompt": "a", "max_tokens": 2}
        status, headers, body = exchange("POST", f"{base}/v1/completions", body)
    assert status == 429
    assert headers["retry-after"] == "1"
    assert json.loads(body)["error"]["code"] == "queue_full"


def test_client_disconnect_cancels_the_request(lm: LM) -> None:
    """Closing a stream early frees the request's batch row instead of decoding to max_tokens."""
    app = create_app(lm, name="tiny")
    engine = app.state.service.engine
    with running_server(app) as base:
        body = {"model": "tiny", "prompt": "a", "max_tokens": 200, "stream": True, "temperature": 1.0}
        conn = HTTPConnection(base.removeprefix("http://"), timeout=60)
        conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        assert conn.getresponse().readline().startswith(b"data: ")
        conn.close()
        deadline = time.monotonic() + 20
        while engine.has_work and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not engine.has_work


@pytest.mark.parametrize("body", [
    {"prompt": [[1, 2, 10**6]]},  # a token id outside the vocabulary
    {"prompt": "a", "n": 99},
    {"prompt": "a", "logprobs": 21},
    {"prompt": "a", "stop": [""]},
    {"prompt": []},
    {"prompt": "a", "top_p": 0},
])
def test_bad_completion_fields_are_400(url: str, body: dict) -> None:
    status, _, raw = exchange("POST", f"{url}/v1/completions", {"model": "tiny", "max_tokens": 2, **body})
    assert status == 400, raw
    assert json.loads(raw)["error"]["message"]


def test_shutdown_lets_running_requests_end_and_refuses_new_ones(lm: LM) -> None:
    """Graceful shutdown: new work gets 503 + Retry-After; what still runs after the grace period is
    cancelled (its stream ends with a finish), never left hanging."""
    from lmforge.infer.engine import Request
    from lmforge.infer.sampling import SamplingParams
    from lmforge.infer.service import APIError, Service

    svc = Service(lm, "tiny", max_batch=2, max_queue=4)
    finished = []
    request = Request([5, 6, 7], SamplingParams(max_new_tokens=200, stop_at_eos=False),
                      on_output=lambda out: finished.append(out.finish_reason) if out.finish_reason else None)
    svc.runner.submit([request])  # queued before the engine thread starts: shutdown must still end it
    svc.runner.start()
    svc.runner.shutdown(grace=0.0)
    assert request.finished and finished == [request.finish_reason]
    assert request.finish_reason in ("cancelled", "length")
    with pytest.raises(APIError) as refused:
        svc.runner.submit([Request([5], SamplingParams(max_new_tokens=2))])
    assert refused.value.status == 503 and refused.value.retry_after


def test_beam_search_over_http_equals_the_python_api(client: openai.OpenAI, lm: LM) -> None:
    reply = client.completions.create(model="tiny", prompt="the cat", max_tokens=6,
                                      extra_body={"num_beams": 3, "length_penalty": 0.5})
    assert reply.choices[0].text == lm.generate("the cat", max_new_tokens=6, num_beams=3, length_penalty=0.5)


def test_requests_beyond_max_model_len_are_400_naming_it(lm: LM) -> None:
    """With max_model_len below the model's context, prompt + max_tokens beyond it gets OpenAI's 400
    context_length_exceeded naming max_model_len; the cache holds only max_batch rows of that length."""
    app = create_app(lm, name="tiny", max_batch=2, max_model_len=24)
    engine = app.state.service.engine
    assert engine.max_model_len == 24 < lm.config.max_position_embeddings
    assert engine.cache.max_length == 24 and engine.cache.slots == 2
    with running_server(app) as base:
        status, _, raw = exchange("POST", f"{base}/v1/completions",
                                  {"model": "tiny", "prompt": list(range(1, 21)), "max_tokens": 5})
        assert status == 400, raw
        error = json.loads(raw)["error"]
        assert "max_model_len=24" in error["message"]
        assert error["code"] == "context_length_exceeded" and error["param"] == "max_tokens"
        status, _, raw = exchange("POST", f"{base}/v1/completions",
                                  {"model": "tiny", "prompt": list(range(1, 21)), "max_tokens": 4})
        assert status == 200 and json.loads(raw)["usage"]["total_tokens"] <= 24
        models = json.loads(exchange("GET", f"{base}/v1/models")[2])
        assert models["data"][0]["max_model_len"] == 24


def test_a_greedy_request_decodes_while_a_beam_search_runs(lm: LM) -> None:
    """Beam search no longer holds the engine: a greedy request submitted with a long beam search gets its
    tokens in the same engine steps, and both replies equal the Python API's."""
    from lmforge.infer.engine import Request
    from lmforge.infer.sampling import SamplingParams
    from lmforge.infer.service import Service

    svc = Service(lm, "tiny", max_batch=4, max_queue=4)
    beam = Request(lm.tokenizer.encode("the cat"), SamplingParams(num_beams=3, max_new_tokens=30, stop_at_eos=False))
    greedy = Request(lm.tokenizer.encode("a model"), SamplingParams(max_new_tokens=6, temperature=0,
                                                                    stop_at_eos=False))
    svc.engine.add(beam)
    svc.engine.add(greedy)
    texts = {beam.id: "", greedy.id: ""}
    while not greedy.finished:
        for out in svc.engine.step():
            texts[out.request.id] += out.text
    assert not beam.finished
    while svc.engine.has_work:
        for out in svc.engine.step():
            texts[out.request.id] += out.text
    assert texts[greedy.id] == lm.generate("a model", max_new_tokens=6, temperature=0, stop_at_eos=False)
    assert texts[beam.id] == lm.generate("the cat", num_beams=3, max_new_tokens=30, stop_at_eos=False)
