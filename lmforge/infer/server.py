"""An OpenAI-compatible HTTP server over the inference engine (FastAPI + uvicorn), with a chat page at `/`.

/v1/models, /v1/completions (with echo and logprobs, so lm-evaluation-harness's `local-completions` can
score loglikelihoods), /v1/chat/completions, both streaming as server-sent events with `"stream": true`;
/health; /metrics for Prometheus. Bad input gets a 4xx with OpenAI's error body and never reaches the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge.data.index import DocumentIndex, cited_sources, quote_chunks
from lmforge.infer.cache import GiB
from lmforge.infer.documents import AnswerRequest, open_index
from lmforge.infer.engine import Output, Request
from lmforge.infer.limits import MAX_REQUEST_BYTES, BodyLimit, bad_json_message, client_key
from lmforge.infer.protocol import ChatRequest, CompletionRequest, TokenizeRequest, error_body
from lmforge.infer.service import APIError, Service, new_id, sse
from lmforge.lm import LM
from lmforge.precision import InferenceDtype

log = logging.getLogger("lmforge.serve")
WEB_PAGE = Path(__file__).parent / "web" / "index.html"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def create_app(lm: LM, *, name: str = "lmforge", api_key: str | None = None, max_batch: int = 16,
               max_queue: int = 256, max_model_len: int | None = None, shutdown_grace: float = 10.0,
               max_request_bytes: int = MAX_REQUEST_BYTES, max_concurrent_per_key: int | None = None,
               request_timeout: float | None = None, documents: DocumentIndex | None = None) -> FastAPI:
    """The app serving `lm` as model `name`; its lifespan starts and (gracefully) stops the engine thread.
    With `documents` (an opened index) it also answers questions from them on POST /v1/answer."""
    if lm.is_seq2seq:
        return seq2seq_app(lm, name=name, api_key=api_key, max_request_bytes=max_request_bytes)
    svc = Service(lm, name, max_batch, max_queue, max_model_len, max_concurrent_per_key=max_concurrent_per_key,
                  request_timeout=request_timeout)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        svc.runner.start()
        yield
        await asyncio.to_thread(svc.runner.shutdown, shutdown_grace)

    app = FastAPI(title="lmforge", lifespan=lifespan)
    app.state.service = svc
    app.add_middleware(BodyLimit, max_bytes=max_request_bytes)

    async def authorize(request: HTTPRequest) -> None:
        if api_key is not None and request.headers.get("authorization", "") != f"Bearer {api_key}":
            raise APIError(401, "missing or wrong API key (send `Authorization: Bearer KEY`)", code="invalid_api_key")

    @app.exception_handler(APIError)
    async def api_error(request: HTTPRequest, exc: APIError) -> JSONResponse:
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
        return JSONResponse(exc.body, status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: HTTPRequest, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":  # say what is wrong and where, not "JSON decode error"
            return JSONResponse(error_body(bad_json_message(first)), status_code=400)
        loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return JSONResponse(error_body(f"{loc or 'body'}: {first.get('msg', 'invalid request')}", param=loc or None),
                            status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: HTTPRequest, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(exc.detail)), status_code=exc.status_code)

    @app.middleware("http")
    async def count_requests(request: HTTPRequest, call_next: Any) -> Response:
        response = await call_next(request)
        if request.url.path.startswith("/v1/"):
            svc.metrics.requests.labels(request.url.path, str(response.status_code)).inc()
        return response

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok" if svc.runner.accepting else "shutting_down", "model": name,
                "running": len(svc.engine.running), "waiting": len(svc.engine.waiting)}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(svc.metrics.render(), media_type=svc.metrics.content_type)

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(WEB_PAGE.read_text(encoding="utf-8"))

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": svc.created,
                                            "owned_by": "lmforge", "max_model_len": svc.context,
                                            "documents": documents is not None}]}

    @app.post("/tokenize", dependencies=[Depends(authorize)])
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        """vLLM's route: how many tokens a prompt (or a conversation, as the chat route renders it) takes, so
        a client (the chat page) can ask for a max_tokens that fits the context."""
        if body.messages is not None:
            chat = ChatRequest(model=body.model or name, messages=body.messages)
            ids, _ = await svc.offload(svc.chat_ids, chat)
        else:
            ids = await svc.offload(svc.encode, body.prompt or "", "prompt")
        return {"count": len(ids), "max_model_len": svc.context, "tokens": ids}

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(body: CompletionRequest, http: HTTPRequest) -> Any:
        svc.check_model(body)
        prompts = await svc.offload(svc.prompts, body)
        score = body.logprobs if body.echo and body.logprobs is not None else None
        requests, origin = [], {}
        for ids in prompts:
            max_new = svc.budget(body, len(ids), default=16)
            for j in range(body.n):
                r = Request(ids, body.sampling(max_new, j, logprobs=body.logprobs, stop=svc.fim_stops(body)),
                            prompt_logprobs=score)
                origin[r.id] = (len(requests), ids)
                requests.append(r)
        queue = svc.submit(requests, client_key(http))
        rid, created = new_id("cmpl"), int(time.time())
        head = {"id": rid, "object": "text_completion", "created": created, "model": name}
        if body.stream:
            return StreamingResponse(stream_completions(svc, body, head, requests, queue, origin),
                                     media_type="text/event-stream", headers=SSE_HEADERS)
        grouped = await svc.collect(requests, queue)
        choices, completion_tokens = [], 0
        for r in requests:
            outs = grouped[r.id]
            tokens = [t for o in outs for t in o.token_ids]
            completion_tokens += len(tokens)
            text = "".join(o.text for o in outs)
            prefix = svc.tokenizer.decode(r.prompt_ids) if body.echo else ""
            logprobs = None
            if body.logprobs is not None:
                entries = [e for o in outs for e in o.logprobs or []]
                if len(entries) < len(tokens):  # beam search or a stop: no per-token logprobs
                    entries += [None] * (len(tokens) - len(entries))
                logprobs = svc.completion_logprobs(tokens, entries, len(prefix))
                if body.echo:
                    prompt_entries = next((o.prompt_logprobs for o in outs if o.prompt_logprobs), None)
                    echoed = svc.completion_logprobs(r.prompt_ids, prompt_entries or [None] * len(r.prompt_ids))
                    logprobs = {k: echoed[k] + logprobs[k] for k in logprobs}
            choices.append({"index": origin[r.id][0], "text": prefix + text, "logprobs": logprobs,
                            "finish_reason": svc.finish_reason(outs[-1])})
        prompt_tokens = sum(len(ids) for ids in prompts) * body.n
        return {**head, "choices": choices, "usage": svc.usage(prompt_tokens, completion_tokens)}

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(body: ChatRequest, http: HTTPRequest) -> Any:
        svc.check_model(body)
        ids, turn_end = await svc.offload(svc.chat_ids, body)
        max_new = svc.budget(body, len(ids), default=None)
        top = (body.top_logprobs or 0) if body.logprobs else None
        requests = [Request(ids, body.sampling(max_new, j, logprobs=top, stop=turn_end)) for j in range(body.n)]
        queue = svc.submit(requests, client_key(http))
        index = {r.id: j for j, r in enumerate(requests)}
        head = {"id": new_id("chatcmpl"), "created": int(time.time()), "model": name}
        if body.stream:
            return StreamingResponse(stream_chat(svc, body, head, requests, queue, index),
                                     media_type="text/event-stream", headers=SSE_HEADERS)
        grouped = await svc.collect(requests, queue)
        choices, completion_tokens = [], 0
        for r in requests:
            outs = grouped[r.id]
            completion_tokens += sum(len(o.token_ids) for o in outs)
            logprobs = svc.chat_logprobs([e for o in outs for e in o.logprobs or []]) if body.logprobs else None
            choices.append({"index": index[r.id], "message": {"role": "assistant",
                                                              "content": "".join(o.text for o in outs)},
                            "logprobs": logprobs, "finish_reason": svc.finish_reason(outs[-1])})
        return {**head, "object": "chat.completion", "choices": choices,
                "usage": svc.usage(len(ids) * body.n, completion_tokens)}

    if documents is not None:
        @app.post("/v1/answer", dependencies=[Depends(authorize)])
        async def answer(body: AnswerRequest, http: HTTPRequest) -> dict[str, Any]:
            """`lmforge answer` over HTTP: the retrieved chunks quoted in a chat prompt, the cited answer and
            its sources ([n] file#chunk), generated by the same engine as every other route."""
            hits = await svc.offload(documents.search, body.question, body.k, body.mode)
            chat = ChatRequest(model=name, messages=quote_chunks(body.question, hits), max_tokens=body.max_tokens,
                               temperature=body.temperature)
            ids, turn_end = await svc.offload(svc.chat_ids, chat)
            requests = [Request(ids, chat.sampling(svc.budget(chat, len(ids), default=None), 0, stop=turn_end))]
            grouped = await svc.collect(requests, svc.submit(requests, client_key(http)))
            text = "".join(o.text for o in grouped[requests[0].id])
            return {"question": body.question, "answer": text.strip(), "sources": cited_sources(text, hits),
                    "chunks": [h.to_dict() for h in hits], "model": name}

    return app


async def stream_completions(svc: Service, body: CompletionRequest, head: dict[str, Any], requests: list[Request],
                             queue: asyncio.Queue[Output], origin: dict[str, tuple[int, list[int]]]
                             ) -> AsyncIterator[str]:
    """text_completion chunks as tokens arrive; the echoed prompt first; then `[DONE]`."""
    completion_tokens = 0
    try:
        if body.echo:
            for r in requests:
                yield sse({**head, "choices": [{"index": origin[r.id][0], "text": svc.tokenizer.decode(r.prompt_ids),
                                                "logprobs": None, "finish_reason": None}]})
        async for out in svc.outputs(requests, queue):
            completion_tokens += len(out.token_ids)
            if not out.text and out.finish_reason is None:
                continue
            logprobs = None
            if body.logprobs is not None and out.logprobs:
                logprobs = svc.completion_logprobs(out.token_ids, list(out.logprobs))
            finish = svc.finish_reason(out) if out.finish_reason is not None else None
            yield sse({**head, "choices": [{"index": origin[out.request.id][0], "text": out.text,
                                            "logprobs": logprobs, "finish_reason": finish}]})
        if body.stream_options and body.stream_options.include_usage:
            prompt_tokens = sum(len(r.prompt_ids) for r in requests)
            yield sse({**head, "choices": [], "usage": svc.usage(prompt_tokens, completion_tokens)})
    except APIError as e:  # headers are sent: report in-band, as OpenAI does
        yield sse(e.body)
    yield sse("[DONE]")


async def stream_chat(svc: Service, body: ChatRequest, head: dict[str, Any], requests: list[Request],
                      queue: asyncio.Queue[Output], index: dict[str, int]) -> AsyncIterator[str]:
    """chat.completion.chunk events: the assistant role, content deltas, the finish reason, then `[DONE]`."""
    chunk = {**head, "object": "chat.completion.chunk"}
    completion_tokens = 0
    try:
        for r in requests:
            yield sse({**chunk, "choices": [{"index": index[r.id], "delta": {"role": "assistant", "content": ""},
                                             "logprobs": None, "finish_reason": None}]})
        async for out in svc.outputs(requests, queue):
            completion_tokens += len(out.token_ids)
            logprobs = svc.chat_logprobs(out.logprobs) if body.logprobs and out.logprobs else None
            if out.text or logprobs:
                yield sse({**chunk, "choices": [{"index": index[out.request.id], "delta": {"content": out.text},
                                                 "logprobs": logprobs, "finish_reason": None}]})
            if out.finish_reason is not None:
                yield sse({**chunk, "choices": [{"index": index[out.request.id], "delta": {}, "logprobs": None,
                                                 "finish_reason": svc.finish_reason(out)}]})
        if body.stream_options and body.stream_options.include_usage:
            prompt_tokens = sum(len(r.prompt_ids) for r in requests)
            yield sse({**chunk, "choices": [], "usage": svc.usage(prompt_tokens, completion_tokens)})
    except APIError as e:
        yield sse(e.body)
    yield sse("[DONE]")


def serve(
    model: Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    api_key: str | None = None,
    max_batch: int = 16,
    max_queue: int = 256,
    max_model_len: int | None = None,
    name: str | None = None,
    device: str | None = None,
    dtype: InferenceDtype = "auto",
    compile: bool = False,
    max_request_bytes: int = MAX_REQUEST_BYTES,
    max_concurrent_per_key: int | None = None,
    request_timeout: float | None = None,
    index: Path | None = None,
) -> None:
    """Serve a checkpoint over an OpenAI-compatible HTTP API, with a chat page at http://HOST:PORT/.

    Endpoints: /v1/models, /v1/completions, /v1/chat/completions (both with "stream": true), /health,
    /metrics (Prometheus). Ctrl-C lets in-flight requests finish (up to 10 s), then exits.

    Args:
        model: Checkpoint directory.
        host: Interface to listen on; 0.0.0.0 for every interface.
        port: TCP port.
        api_key: If set, /v1 requests must send `Authorization: Bearer API_KEY`.
        max_batch: Most requests decoded together.
        max_queue: Most requests waiting for a batch row; beyond it the server answers 429 with Retry-After.
        max_model_len: Most tokens (prompt + max_tokens) per request; longer requests get a 400. By default
            the model's context, or less where a KV cache of max_batch rows would not fit a quarter of the
            free memory. The cache for max_batch rows of it is allocated at start.
        name: The model id clients send; the checkpoint directory's name by default.
        device: "cpu", "cuda", ...; default CUDA when present.
        dtype: "auto" (default) serves in bfloat16 where this machine has fast bf16 matmuls (AMX, a recent GPU),
            else in the checkpoint's own; "float32" or "bfloat16" forces one (bf16 halves the bytes a token reads).
        compile: Decode through a compiled step (1.5-3x faster per token on a CPU); it compiles (20-90 s)
            before the server listens.
        max_request_bytes: Largest request body accepted; a larger one gets a 413 before it is read whole.
        max_concurrent_per_key: Most requests in flight at once per API key (per client address without
            keys); beyond it a 429 with Retry-After. Default: no limit but --max-queue.
        request_timeout: Seconds a request may run (waiting included) before it is cancelled with a 504
            (in-band for a stream). Default: no limit.
        index: An index written by `lmforge index`: POST /v1/answer {"question": ...} then answers from those
            documents with cited sources, as `lmforge answer` does.
    """
    import uvicorn

    from lmforge.lm import load

    lm = load(model, device=device, dtype=dtype, compile=compile)
    lm.require_decoder("serve completions")
    served = name or Path(model).resolve().name
    if compile:
        print("compiling the decode step (20-90 s on a CPU, less once inductor has cached its kernels)", flush=True)
    documents = open_index(Path(index), device=device) if index is not None else None
    app = create_app(lm, name=served, api_key=api_key, max_batch=max_batch, max_queue=max_queue,
                     max_model_len=max_model_len, max_request_bytes=max_request_bytes,
                     max_concurrent_per_key=max_concurrent_per_key, request_timeout=request_timeout,
                     documents=documents)
    engine = getattr(app.state, "service", None) and app.state.service.engine
    if engine is not None:
        print(f"max_model_len {engine.max_model_len} (model context {engine.context}): KV cache "
              f"{engine.cache_bytes / GiB:.2f} GiB for {max_batch} rows", flush=True)
    print(f"serving {model} as model {served!r} on http://{host}:{port}/", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=10)


def seq2seq_app(lm: LM, *, name: str, api_key: str | None = None, max_request_bytes: int = MAX_REQUEST_BYTES,
                ) -> FastAPI:
    """An encoder-decoder (translation, summarization) served OpenAI-style: on /v1/completions the prompt is the
    source and the completion its output, decoded by `LM.translate` one request at a time (beam search or greedy
    from the checkpoint's generation_config unless the request sets temperature / num_beams); no streaming."""
    app = FastAPI(title="lmforge")
    app.add_middleware(BodyLimit, max_bytes=max_request_bytes)
    created, one_at_a_time = int(time.time()), asyncio.Lock()

    async def authorize(request: HTTPRequest) -> None:
        if api_key is not None and request.headers.get("authorization", "") != f"Bearer {api_key}":
            raise APIError(401, "missing or wrong API key (send `Authorization: Bearer KEY`)", code="invalid_api_key")

    @app.exception_handler(APIError)
    async def api_error(request: HTTPRequest, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body, status_code=exc.status)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": name}

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "lmforge",
                                            "max_model_len": lm.config.max_positions}]}

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(body: CompletionRequest) -> Any:
        if body.model != name:
            raise APIError(404, f"model {body.model!r} does not exist; this server serves {name!r}", param="model",
                           code="model_not_found")
        if body.stream:
            raise APIError(400, "an encoder-decoder replies whole; send stream=false", param="stream")
        prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        if prompts and isinstance(prompts[0], int):
            prompts = [prompts]
        sources = [p if isinstance(p, str) else lm.tokenizer.decode(p) for p in prompts]
        given = body.model_fields_set  # unset fields keep the checkpoint's decoding defaults (OpenAI's would sample)
        options = {k: getattr(body, k) for k in ("temperature", "top_p", "num_beams", "length_penalty", "seed")
                   if k in given}
        if body.max_tokens is not None:
            options["max_new_tokens"] = body.max_tokens
        beams = options.get("num_beams", lm.sampling().num_beams)
        async with one_at_a_time:
            if body.n > 1 and beams >= body.n:  # n choices = the n best beams
                outputs = await asyncio.to_thread(lm.translate, sources, num_return_sequences=body.n, **options)
            else:
                seed = options.pop("seed", None)
                runs = [await asyncio.to_thread(lm.translate, sources, seed=None if seed is None else seed + j,
                                                **options) for j in range(body.n)]
                outputs = [[run[i] for run in runs] for i in range(len(sources))] if body.n > 1 else runs[0]
        texts = [[o] if isinstance(o, str) else o for o in outputs]
        choices = [{"index": i * body.n + j, "text": text, "logprobs": None, "finish_reason": "stop"}
                   for i, n_best in enumerate(texts) for j, text in enumerate(n_best)]
        prompt_tokens = sum(len(ids) for ids in lm.tokenizer.encode_batch(sources, add_bos=False))
        completion_tokens = sum(len(ids) for c in choices for ids in [lm.tokenizer.encode(c["text"], add_bos=False)])
        return {"id": new_id("cmpl"), "object": "text_completion", "created": int(time.time()), "model": name,
                "choices": choices, "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                              "total_tokens": prompt_tokens + completion_tokens}}

    return app
