"""What the HTTP routes share: the engine thread, OpenAI errors, request checks and response pieces.

The engine runs on one background thread and steps whenever it has work; an HTTP request adds engine
requests whose outputs come back to its event loop through an asyncio queue, so concurrent clients share
every batched forward. Everything a client can get wrong is checked here, before the engine sees it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from lmforge.errors import ConfigError
from lmforge.infer.engine import Engine, Output, Request, TokenLogprob
from lmforge.infer.metrics import Metrics
from lmforge.infer.protocol import ChatRequest, CompletionRequest, SamplingFields, error_body
from lmforge.lm import LM

log = logging.getLogger("lmforge.serve")


class APIError(Exception):
    """An error with an HTTP status and OpenAI's body; `retry_after` adds the header for 429/503."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status, self.body, self.retry_after = status, error_body(message, type_, param, code), retry_after


class EngineRunner:
    """Steps the engine on one thread while it has work; the event loop submits and cancels requests."""

    def __init__(self, engine: Engine, max_queue: int) -> None:
        self.engine, self.max_queue = engine, max_queue
        self.accepting = True
        self._wake = threading.Event()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="lmforge-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, requests: list[Request]) -> None:
        if not self.accepting:
            raise APIError(503, "the server is shutting down", "server_error", code="shutting_down", retry_after=5)
        if len(self.engine.waiting) + len(requests) > self.max_queue:
            raise APIError(429, f"the queue is full ({self.max_queue} requests waiting); retry shortly",
                           "rate_limit_error", code="queue_full", retry_after=1)
        for r in requests:
            self.engine.add(r)
        self._wake.set()

    def cancel(self, request_id: str) -> None:
        self.engine.cancel(request_id)
        self._wake.set()

    def _loop(self) -> None:
        while not self._stopped:
            if not self.engine.has_work:
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                self.engine.step()
            except Exception:  # a bug must not kill the server: fail the batch, keep serving
                log.exception("engine step failed; ending the running requests")
                self.engine.abort("error")

    def shutdown(self, grace: float) -> None:
        """Refuse new work, let running requests finish for up to `grace` seconds, cancel the rest."""
        self.accepting = False
        deadline = time.monotonic() + grace
        while self.engine.has_work and time.monotonic() < deadline:
            time.sleep(0.05)
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=10)
        self.engine.abort("cancelled")


class Service:
    """One served model: its engine thread, metrics, and the checks and formatting the routes share."""

    def __init__(self, lm: LM, name: str, max_batch: int, max_queue: int, max_model_len: int | None = None) -> None:
        self.lm, self.name, self.tokenizer = lm, name, lm.tokenizer
        self.engine = Engine(lm.model, lm.tokenizer, max_batch=max_batch, max_model_len=max_model_len)
        self.runner = EngineRunner(self.engine, max_queue)
        self.metrics = Metrics(self.engine)
        self.context = self.engine.max_model_len
        self.created = int(time.time())

    # ----- checks -----------------------------------------------------------------------------

    def check_model(self, body: SamplingFields) -> None:
        if body.model != self.name:
            raise APIError(404, f"model {body.model!r} does not exist; this server serves {self.name!r}",
                           param="model", code="model_not_found")

    def budget(self, body: SamplingFields, prompt_len: int, default: int | None) -> int:
        """max_tokens, checked as OpenAI does: prompt + max_tokens must fit max_model_len (the context, or
        less where the KV cache would not fit memory)."""
        wanted = body.max_completion_tokens if isinstance(body, ChatRequest) else None
        wanted = wanted if wanted is not None else body.max_tokens
        if wanted is None:
            wanted = default if default is not None else self.context - prompt_len
        if prompt_len + wanted > self.context or prompt_len >= self.context:
            raise APIError(400, f"this model's maximum context length is {self.context} tokens (max_model_len="
                                f"{self.context}); the prompt has {prompt_len} and max_tokens asks for {wanted} more",
                           param="max_tokens", code="context_length_exceeded")
        return wanted

    def prompts(self, body: CompletionRequest) -> list[list[int]]:
        """The prompt field in any of its four OpenAI forms, as token id lists."""
        p = body.prompt
        if isinstance(p, str):
            batch = [self.tokenizer.encode(p)]
        elif p and all(isinstance(x, str) for x in p):
            batch = self.tokenizer.encode_batch(p)
        elif p and all(isinstance(x, int) for x in p):
            batch = [list(p)]
        else:
            batch = [list(x) for x in p]
        vocab = self.lm.config.vocab_size
        for ids in batch:
            if not ids:
                raise APIError(400, "prompt is empty: the model needs at least one token", param="prompt")
            if any(not 0 <= t < vocab for t in ids):
                raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
        return batch

    def chat_ids(self, body: ChatRequest) -> tuple[list[int], list[str]]:
        from lmforge.infer.text import chat_prompt

        try:
            prompt, turn_end = chat_prompt(self.tokenizer, body.conversation())
        except ConfigError as e:
            raise APIError(400, str(e), param="messages") from None
        return self.tokenizer.encode(prompt), turn_end

    # ----- running --------------------------------------------------------------------------

    def submit(self, requests: list[Request]) -> asyncio.Queue[Output]:
        """Queue engine requests; their outputs arrive, interleaved, on the returned queue."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Output] = asyncio.Queue()
        for r in requests:
            r.on_output = lambda out: _post(loop, queue, out)
        try:
            self.runner.submit(requests)
        except ConfigError as e:
            raise APIError(400, str(e)) from None
        self.metrics.prompt_tokens.inc(sum(len(r.prompt_ids) for r in requests))
        return queue

    async def outputs(self, requests: list[Request], queue: asyncio.Queue[Output]) -> AsyncIterator[Output]:
        """Outputs until every request has finished; cancels the rest if the consumer goes away."""
        start = time.perf_counter()
        last: dict[str, float] = {}
        left = {r.id for r in requests}
        try:
            while left:
                out = await queue.get()
                now, rid = time.perf_counter(), out.request.id
                if out.token_ids:
                    self.metrics.tokens.inc(len(out.token_ids))
                    (self.metrics.itl.observe(now - last[rid]) if rid in last
                     else self.metrics.ttft.observe(now - start))
                    last[rid] = now
                if out.finish_reason is not None:
                    self.metrics.latency.observe(now - start)
                    left.discard(rid)
                    if out.finish_reason == "error":
                        raise APIError(500, "the engine failed on this request", "server_error")
                yield out
        finally:
            for r in requests:
                if not r.finished:
                    self.runner.cancel(r.id)

    async def collect(self, requests: list[Request], queue: asyncio.Queue[Output]) -> dict[str, list[Output]]:
        grouped: dict[str, list[Output]] = {r.id: [] for r in requests}
        async for out in self.outputs(requests, queue):
            grouped[out.request.id].append(out)
        return grouped

    # ----- response pieces -------------------------------------------------------------------

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def completion_logprobs(self, ids: list[int], entries: list[TokenLogprob | None], offset: int = 0
                            ) -> dict[str, Any]:
        """The legacy completions shape: parallel lists of tokens, their logprobs, top alternatives, offsets."""
        tokens, values, tops, offsets = [], [], [], []
        for token_id, entry in zip(ids, entries):
            text = self.token_text(token_id)
            tokens.append(text)
            values.append(None if entry is None else entry.logprob)
            tops.append(None if entry is None else {self.token_text(t): v for t, v in entry.top})
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}

    def chat_logprobs(self, entries: list[TokenLogprob]) -> dict[str, Any]:
        def item(token_id: int, value: float) -> dict[str, Any]:
            text = self.token_text(token_id)
            return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8"))}

        return {"content": [{**item(e.token_id, e.logprob), "top_logprobs": [item(t, v) for t, v in e.top]}
                            for e in entries]}

    @staticmethod
    def finish_reason(out: Output) -> str:
        return "length" if out.finish_reason == "length" else "stop"

    def usage(self, prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}


def _post(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[Output], out: Output) -> None:
    """Hand an output from the engine thread to the request's event loop (gone if the server stopped)."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(queue.put_nowait, out)


def sse(payload: dict[str, Any] | str) -> str:
    """One server-sent event: `data: <json>` and a blank line."""
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"
