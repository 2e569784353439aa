"""`lmforge eval --model http://.../v1`: an OpenAI-compatible endpoint scored by the same harness.

Our own server on loopback is the endpoint where numbers must match; small FastAPI apps stand in for
endpoints that rate-limit, fail, or lack prompt logprobs or a completions route.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import running_server
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

import lmforge
from lmforge.cli import main
from lmforge.errors import ConfigError
from lmforge.eval.harness import Unsupported
from lmforge.eval.remote import RemoteLM
from lmforge.eval.sandbox import Limits, run_python
from lmforge.eval.tasks import load_task
from lmforge.infer.server import create_app
from lmforge.lm import LM

TASKS = Path(__file__).resolve().parents[2] / "tasks"


def sandboxed() -> bool:
    try:
        run_python("pass", Limits(timeout=10))
        return True
    except ConfigError:
        return False


@pytest.fixture(scope="module")
def checkpoint(make_checkpoint: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A context the shipped tasks' prompts fit: where a prompt is cut, an endpoint scores one token less of it
    (a prompt must be shorter than its context) than a local run, which feeds the model a whole window."""
    return make_checkpoint("gpt2-tiny", out=tmp_path_factory.mktemp("remote_ckpt") / "run",
                           max_position_embeddings=512)


@pytest.fixture(scope="module")
def served(checkpoint: Path) -> Iterator[tuple[str, list[str]]]:
    """`lmforge serve` of the checkpoint in-process; yields its /v1 URL and a log of the POSTs it answered."""
    app = create_app(lmforge.load(checkpoint, device="cpu"), name="tiny", max_batch=4, api_key="KEY")
    posts: list[str] = []

    @app.middleware("http")
    async def record(request: Request, call_next):
        if request.method == "POST":
            posts.append(request.url.path)
        return await call_next(request)

    with running_server(app) as base:
        yield f"{base}/v1", posts


def test_eval_over_http_equals_eval_of_the_checkpoint(checkpoint: Path, served: tuple[str, list[str]],
                                                      tmp_path: Path) -> None:
    """Every shipped task scored through `lmforge serve` over HTTP (token ids, echo + logprobs, greedy and
    seeded completions) gives the numbers, predictions and skips of the same checkpoint evaluated from disk;
    the report names the endpoint and its model id, never the key."""
    url, _ = served
    flags = dict(seed=5, progress=False, unsafe_no_sandbox=not sandboxed())
    local = lmforge.evaluate(checkpoint, TASKS, tmp_path / "local.json", **flags)
    remote = lmforge.evaluate(url, TASKS, tmp_path / "remote.json", api_key="KEY", tokenizer=checkpoint,
                              cache=tmp_path / "cache", concurrency=4, **flags)
    assert set(remote) == set(local) and set(local["skipped"]) == {"sentiment"}
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("local", "remote"))
    assert b["skipped"] == a["skipped"]
    for name, result in a["tasks"].items():
        theirs = b["tasks"][name]
        assert theirs["metrics"] == pytest.approx(result["metrics"], rel=1e-5, abs=1e-6), name
        for mine, other in zip(result["details"], theirs["details"]):
            for key in ("pred", "pred_norm", "prediction", "greedy", "passed"):
                assert mine.get(key) == other.get(key), (name, key)
    assert set(a["tasks"]) == {"capitals", "proverbs", "antonyms", "python_functions"}
    assert b["model"]["url"] == url and b["model"]["model_id"] == "tiny" and b["model"]["max_model_len"] == 512
    assert b["model"]["tokenizer_sha256"] == a["model"]["tokenizer_sha256"]
    assert "KEY" not in (tmp_path / "remote.json").read_text()


def test_a_rerun_is_answered_from_the_cache(served: tuple[str, list[str]], checkpoint: Path, tmp_path: Path) -> None:
    """`lmforge eval --model URL ...` from the CLI; the second identical run sends no completion request:
    every answer comes from the on-disk cache."""
    url, posts = served
    task, cache, out = TASKS / "capitals.yaml", tmp_path / "cache", tmp_path / "remote.json"
    assert main(["eval", "--model", url, "--api-key", "KEY", "--tokenizer", str(checkpoint), "--tasks", str(task),
                 "--out", str(out), "--cache", str(cache), "--progress", "false"]) == 0
    first = json.loads(out.read_text())
    assert first["model"]["url"] == url
    sent = len(posts)
    assert sent > 0 and len(list(cache.rglob("*.json"))) == 4 * 12  # four choices for each of 12 questions
    again = lmforge.evaluate(url, task, api_key="KEY", tokenizer=checkpoint, cache=cache, progress=False)
    assert again["capitals"] == first["tasks"]["capitals"]["metrics"] and len(posts) == sent


def test_text_prompts_score_the_continuation_tokens(served: tuple[str, list[str]], checkpoint: Path,
                                                    tmp_path: Path) -> None:
    """Without --tokenizer prompts go as text: each continuation's loglikelihood is the sum over the tokens that
    end after the context, conditioned on the context as the endpoint tokenized it (no eos before it)."""
    url, _ = served
    remote = RemoteLM(url, api_key="KEY", cache=tmp_path)
    task = load_task(TASKS / "proverbs.yaml")
    requests = [(e, task.context(i, 0), " " + task.render(task.options["continuation"], e, "continuation"))
                for i, e in enumerate(task.examples[:4])]
    scores = remote.loglikelihoods(task, requests)
    lm = lmforge.load(checkpoint)
    for (_, context, continuation), score in zip(requests, scores):
        ctx = lm.tokenizer.encode(context.rstrip())
        ids = lm.tokenizer.encode(context.rstrip() + continuation)
        with torch.no_grad():
            logp = F.log_softmax(lm.model(torch.tensor([ids[:-1]])).double(), -1)[0]
        expected = float(logp[len(ctx) - 1:].gather(-1, torch.tensor(ids[len(ctx):])[:, None]).sum())
        assert score.loglikelihood == pytest.approx(expected, rel=1e-5)
        assert score.tokens == len(ids) - len(ctx)


def fake_endpoint(*, failures: list[int] | None = None, logprobs: bool = True, has_completions: bool = True
                  ) -> FastAPI:
    """An endpoint listing model "m": /v1/completions answers the statuses in `failures` first (429 with
    Retry-After: 2), then "ok" (with prompt logprobs if `logprobs`); /v1/chat/completions answers "chat ok"."""
    app = FastAPI()
    pending = list(failures or [])

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": "m", "object": "model", "owned_by": "test"}]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> JSONResponse:
        if not has_completions:
            return JSONResponse({"error": {"message": "Not Found"}}, status_code=404)
        if pending:
            status = pending.pop(0)
            return JSONResponse({"error": {"message": "busy"}}, status_code=status,
                                headers={"Retry-After": "2"} if status == 429 else None)
        body = await request.json()
        lp = {"tokens": ["a", " b"], "token_logprobs": [None, -0.5], "top_logprobs": [None, {" b": -0.5}],
              "text_offset": [0, 1]} if logprobs and body.get("echo") else None
        return JSONResponse({"id": "x", "object": "text_completion", "created": 0, "model": "m",
                             "choices": [{"index": 0, "text": "ok", "logprobs": lp, "finish_reason": "stop"}]})

    @app.post("/v1/chat/completions")
    async def chat() -> JSONResponse:
        return JSONResponse({"id": "y", "object": "chat.completion", "created": 0, "model": "m",
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": "chat ok"},
                                          "finish_reason": "stop"}]})

    return app


def test_429_and_503_are_retried_with_back_off(tmp_path: Path) -> None:
    """Two 429s wait what Retry-After says; a 503 without it waits 2^attempt seconds (with jitter in
    [½, 1]); the answer after them is the one returned."""
    waits: list[float] = []
    with running_server(fake_endpoint(failures=[429, 429, 503])) as base:
        remote = RemoteLM(f"{base}/v1", cache=tmp_path, sleep=waits.append)
        assert remote.generate(["x"], max_new_tokens=3) == ["ok"]
    assert waits[:2] == [2.0, 2.0] and 2.0 <= waits[2] <= 4.0 and len(waits) == 3


def test_giving_up_after_max_retries_names_the_endpoint(tmp_path: Path) -> None:
    with running_server(fake_endpoint(failures=[503] * 5)) as base:
        remote = RemoteLM(f"{base}/v1", cache=tmp_path, max_retries=2, sleep=lambda s: None)
        with pytest.raises(ConfigError, match=f"{base}/v1: 503: busy"):
            remote.generate(["x"], max_new_tokens=3)


def test_an_endpoint_without_prompt_logprobs_skips_scoring_tasks_by_name(tmp_path: Path) -> None:
    """Multiple choice needs echo + logprobs: an endpoint that returns none has that task skipped with the
    reason, while its generation task still runs."""
    with running_server(fake_endpoint(logprobs=False)) as base, pytest.warns(UserWarning, match="skipped"):
        summary = lmforge.evaluate(f"{base}/v1", [TASKS / "capitals.yaml", TASKS / "antonyms.yaml"],
                                   cache=tmp_path, progress=False)
    assert "returned no prompt logprobs" in summary["skipped"]["capitals"]
    assert "echo + logprobs" in summary["skipped"]["capitals"]
    assert summary["antonyms"]["exact_match"] == 0.0


def test_a_chat_only_endpoint_generates_through_chat(tmp_path: Path) -> None:
    """No /v1/completions: generation goes to /v1/chat/completions; scoring tasks are refused."""
    with running_server(fake_endpoint(has_completions=False)) as base:
        remote = RemoteLM(f"{base}/v1", cache=tmp_path)
        with pytest.warns(UserWarning, match="through /v1/chat/completions"):
            assert remote.generate(["x", "y"], max_new_tokens=3) == ["chat ok", "chat ok"]
        assert remote.provenance()["api"] == "chat"
        task = load_task(TASKS / "proverbs.yaml")
        with pytest.raises(Unsupported, match="404"):
            remote.loglikelihoods(task, [(task.examples[0], "a", " b")])


def test_endpoint_options_need_an_endpoint_and_several_models_need_a_choice(checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--api-key applies to an HTTP endpoint"):
        lmforge.evaluate(checkpoint, TASKS / "capitals.yaml", api_key="KEY", progress=False)
    app = fake_endpoint()

    @app.get("/v2/models")
    async def two() -> dict:
        return {"object": "list", "data": [{"id": "a"}, {"id": "b"}]}

    message = r"lists 2 models \(a, b\); name the one to evaluate with --served-model"
    with running_server(app) as base, pytest.raises(ConfigError, match=message):
        RemoteLM(f"{base}/v2", cache=tmp_path)


def test_compare_takes_more_than_two_reports(make_lm: Callable[..., LM], tmp_path: Path) -> None:
    """`eval compare a b c`: a column per report and the change of each later one from the first."""
    values = []
    for seed in (0, 1, 2):
        lmforge.evaluate(make_lm("gpt2-tiny", seed=seed), TASKS / "proverbs.yaml", tmp_path / f"{seed}.json",
                         progress=False)
        values.append(json.loads((tmp_path / f"{seed}.json").read_text())["tasks"]["proverbs"]["metrics"])
    table = lmforge.eval.compare(*(tmp_path / f"{s}.json" for s in (0, 1, 2)))
    a, b, c = (v["loglikelihood"] for v in values)
    cells = [f"{v:.4f}" for v in (a, b, c)] + [("+" if d > 0 else "") + f"{d:.4f}" for d in (b - a, c - a)]
    assert f"| proverbs | loglikelihood | {' | '.join(cells)} |" in table
    assert "| task | metric | a | b | c | Δ (b − a) | Δ (c − a) |" in table
    assert not math.isnan(a)
