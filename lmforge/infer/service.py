"""What the HTTP routes share: the engine thread, OpenAI errors, request checks and response pieces.

The engine runs on one background thread and steps whenever it has work; an HTTP request adds engine
requests whose outputs come back to its event loop through an asyncio queue, so concurrent clients share
every batched forward. Everything a client can get wrong is checked here, before the engine sees it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import functools
import json
import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from lmforge.errors import ConfigError
from lmforge.infer.engine import Engine, Output, Request, TokenLogprob
from lmforge.infer.metrics import Metrics
from lmforge.infer.protocol import ChatRequest, CompletionRequest, SamplingFields, error_body
from lmforge.lm import LM

log = logging.getLogger("lmforge.serve")
T = TypeVar("T")


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
    """One served model: its engine thread, metrics, and the checks and formatting the routes share.

    Tokenizing runs on a small thread pool, never on the event loop (a long prompt would stall every
    stream), and a prompt that cannot fit the context is refused from its length in characters or from
    a prefix, never tokenized whole (see `encode`).
    """

    def __init__(self, lm: LM, name: str, max_batch: int, max_queue: int, max_model_len: int | None = None, *,
                 max_concurrent_per_key: int | None = None, request_timeout: float | None = None) -> None:
        self.lm, self.name, self.tokenizer = lm, name, lm.tokenizer
        self.engine = Engine(lm.model, lm.tokenizer, max_batch=max_batch, max_model_len=max_model_len,
                             compile=lm.compile)
        self.engine.warm_up()  # a compiled step compiles here, before the first client waits for it
        self.runner = EngineRunner(self.engine, max_queue)
        self.metrics = Metrics(self.engine)
        self.context = self.engine.max_model_len
        self.created = int(time.time())
        self.max_concurrent_per_key, self.request_timeout = max_concurrent_per_key, request_timeout
        self.in_flight: Counter[str] = Counter()
        self._keys_lock = threading.Lock()
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="lmforge-tokenize")
        # No token is longer than this many characters, so a text of more than (context + 1) times it
        # certainly has more tokens than the context holds.
        vocab = self.tokenizer.hf.get_vocab(with_added_tokens=True)
        self.max_token_chars = max((len(t) for t in vocab), default=1) or 1

    async def offload(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on the tokenizer pool, so the event loop keeps serving streams meanwhile."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, functools.partial(fn, *args))

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
        if body.suffix is not None:
            batch = self.fim_prompts(body)
        elif isinstance(p, str):
            batch = [self.encode(p, "prompt")]
        elif p and all(isinstance(x, str) for x in p):
            for text in p:
                self.encode(text, "prompt", check_only=True)
            batch = self.tokenizer.encode_batch(p)
        elif p and all(isinstance(x, int) for x in p):
            batch = [list(p)]
        else:
            batch = [list(x) for x in p]
        vocab = self.lm.config.vocab_size
        for ids in batch:
            if len(ids) >= self.context:
                raise APIError(400, f"this model's maximum context length is {self.context} tokens; the prompt has "
                                    f"{len(ids)}", param="prompt", code="context_length_exceeded")
            if not ids:
                raise APIError(400, "prompt is empty: the model needs at least one token", param="prompt")
            if any(not 0 <= t < vocab for t in ids):
                raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
        return batch

    def fim_prompts(self, body: CompletionRequest) -> list[list[int]]:
        """OpenAI's `suffix`: each text prompt is the code before the gap, `suffix` the code after it, asked
        through the tokenizer's own FIM sentinels (`lmforge.data.fim.prompt_ids`)."""
        from lmforge.data.fim import prompt_ids

        if self.tokenizer.fim is None:
            raise APIError(400, "this model has no fill-in-the-middle tokens, so it cannot take a suffix",
                           param="suffix")
        texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not all(isinstance(t, str) for t in texts):
            raise APIError(400, "suffix needs the prompt as text, not token ids", param="prompt")
        for text in (*texts, body.suffix):
            self.encode(text, "prompt", check_only=True)
        return [prompt_ids(self.tokenizer, text, body.suffix) for text in texts]

    def fim_stops(self, body: CompletionRequest) -> list[str]:
        """The tokens that end a middle besides eos (the sentinels, and file separators), when FIM is asked."""
        fim = self.tokenizer.fim
        return [*fim.names, *fim.stop_names] if body.suffix is not None and fim is not None else []

    def chat_ids(self, body: ChatRequest) -> tuple[list[int], list[str]]:
        from lmforge.infer.text import chat_prompt

        try:
            prompt, turn_end = chat_prompt(self.tokenizer, body.conversation())
        except ConfigError as e:
            raise APIError(400, str(e), param="messages") from None
        return self.encode(prompt, "messages"), turn_end

    def encode(self, text: str, param: str, *, check_only: bool = False) -> list[int]:
        """Token ids of `text`, refusing one longer than the context without tokenizing all of it: beyond
        (context + 1) × the longest token's characters it cannot fit, and a long text whose first 8 ×
        context characters already overflow is refused from those (a 10 MB prompt costs milliseconds)."""
        too_long = f"this model's maximum context length is {self.context} tokens (max_model_len={self.context})"
        if len(text) > (self.context + 1) * self.max_token_chars:
            raise APIError(400, f"{too_long}; the {param} has {len(text):,} characters, more than that many tokens "
                                "can hold", param=param, code="context_length_exceeded")
        head = 8 * self.context
        if len(text) > head:  # ~4 characters a token in prose: the prefix settles almost every long text
            ids = self.tokenizer.encode(text[:head])
            if len(ids) > self.context:
                raise APIError(400, f"{too_long}; the {param} is longer (its first {head:,} characters alone are "
                                    f"{len(ids):,} tokens)", param=param, code="context_length_exceeded")
        ids = [] if check_only else self.tokenizer.encode(text)
        if len(text) > 1 << 20:
            trim_memory()  # hand a long text's tokenizer buffers back to the OS, not to glibc's free lists
        return ids

    # ----- running --------------------------------------------------------------------------

    def submit(self, requests: list[Request], key: str | None = None) -> asyncio.Queue[Output]:
        """Queue engine requests; their outputs arrive, interleaved, on the returned queue.

        `key` (the API key, or the client's address) counts towards --max-concurrent-per-key until every
        one of `requests` has finished, however it ends (done, cancelled, timed out, failed).
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Output] = asyncio.Queue()
        release = self._take_slot(key, len(requests))

        def deliver(out: Output) -> None:
            _post(loop, queue, out)
            if out.finish_reason is not None:
                release()

        for r in requests:
            r.on_output = deliver
        try:
            self.runner.submit(requests)
        except ConfigError as e:
            release(len(requests))
            raise APIError(400, str(e)) from None
        except APIError:
            release(len(requests))
            raise
        self.metrics.prompt_tokens.inc(sum(len(r.prompt_ids) for r in requests))
        return queue

    def _take_slot(self, key: str | None, parts: int) -> Callable[..., None]:
        """Count one HTTP request of `key` in flight; the returned function, called once per finished engine
        request (`parts` of them), frees the slot after the last."""
        if key is None or self.max_concurrent_per_key is None:
            return lambda n=1: None
        with self._keys_lock:
            if self.in_flight[key] >= self.max_concurrent_per_key:
                raise APIError(429, f"too many requests in flight for this key ({self.max_concurrent_per_key}, "
                                    "--max-concurrent-per-key); wait for one to finish", "rate_limit_error",
                               code="concurrency_limit", retry_after=1)
            self.in_flight[key] += 1
        left = [parts]

        def release(n: int = 1) -> None:
            with self._keys_lock:
                if left[0] <= 0:
                    return
                left[0] -= n
                if left[0] <= 0:
                    self.in_flight[key] -= 1
                    if not self.in_flight[key]:
                        del self.in_flight[key]

        return release

    async def outputs(self, requests: list[Request], queue: asyncio.Queue[Output]) -> AsyncIterator[Output]:
        """Outputs until every request has finished; cancels the rest if the consumer goes away or the
        request runs past --request-timeout."""
        start = time.perf_counter()
        last: dict[str, float] = {}
        left = {r.id for r in requests}
        deadline = None if self.request_timeout is None else time.monotonic() + self.request_timeout
        try:
            while left:
                try:
                    out = await asyncio.wait_for(queue.get(), None if deadline is None
                                                 else max(0.0, deadline - time.monotonic()))
                except TimeoutError:
                    raise APIError(504, f"the request ran longer than {self.request_timeout:g} s (--request-timeout) "
                                        "and was cancelled", "timeout_error", code="request_timeout") from None
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


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (macOS, musl): its allocator returns memory itself
        return None


def trim_memory() -> None:
    """Return freed heap pages to the OS (glibc keeps them otherwise, and the server's RSS never falls)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _post(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[Output], out: Output) -> None:
    """Hand an output from the engine thread to the request's event loop (gone if the server stopped)."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(queue.put_nowait, out)


def sse(payload: dict[str, Any] | str) -> str:
    """One server-sent event: `data: <json>` and a blank line."""
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"
