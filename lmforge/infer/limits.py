"""What keeps one request from stalling the server: a body size limit, who a request counts against, and
bad JSON explained in words.

The body limit is an ASGI middleware that reads the body itself, up to the limit, before FastAPI parses
anything: a declared Content-Length over it is refused unread, and a chunked upload is refused once past
the limit (nothing beyond it kept; the rest is read and dropped so the 413 reaches the client). After a body
over 1 MiB the freed heap is handed back to the OS. (FastAPI turns an exception raised while it reads the
body into "There was an error parsing the body", so the limit cannot live inside the route.)
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lmforge.infer.protocol import error_body
from lmforge.infer.service import trim_memory

# 4 MiB holds about a million characters of JSON text: more than any context served here takes in tokens
# (the prompt is then refused from its length in characters, `Service.encode`), yet parsing it costs
# milliseconds and memory a small multiple of it.
MAX_REQUEST_BYTES = 4 << 20
TRIM_ABOVE = 1 << 20  # after a body this large, freed heap goes back to the OS (else RSS only ever grows)


class BodyLimit:
    """Refuse (413) any request body over `max_bytes`, before a byte of it is parsed."""

    def __init__(self, app: ASGIApp, max_bytes: int = MAX_REQUEST_BYTES) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send, int(declared))
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                chunks.clear()
                await self._drain(receive, message)
                await self._refuse(send, None)
                return
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False
        chunks.clear()

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for a disconnect, as Starlette's streaming does

        await self.app(scope, replay, send)
        if size > TRIM_ABOVE:  # the body, its parsed JSON and the prompt are garbage now: give the pages back
            del body
            await asyncio.get_running_loop().run_in_executor(None, trim_memory)

    async def _drain(self, receive: Receive, message: Message) -> None:
        """Read and drop the rest of an oversized upload (up to 16 x the limit) before answering: closing on
        unread bytes resets the connection, and the client may lose the 413 before it reads it."""
        dropped = 0
        while message.get("more_body", False) and dropped < 16 * self.max_bytes:
            message = await receive()
            if message["type"] != "http.request":
                return
            dropped += len(message.get("body", b""))

    async def _refuse(self, send: Send, declared: int | None) -> None:
        size = f"{declared:,} bytes" if declared is not None else "more than that"
        payload = json.dumps(error_body(
            f"the request body is {size}; this server accepts at most {self.max_bytes:,} bytes "
            "(serve --max-request-bytes)", code="request_too_large")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": payload})


def client_key(request: Request) -> str:
    """Who a request counts against for --max-concurrent-per-key: its API key, else its address."""
    auth = request.headers.get("authorization", "")
    if auth.startswith("Bearer ") and len(auth) > 7:
        return "key:" + auth[7:]
    return "addr:" + (request.client.host if request.client else "?")


def bad_json_message(error: dict[str, Any]) -> str:
    """pydantic's `json_invalid` error ("JSON decode error") in words: what the parser expected, and where."""
    loc = error.get("loc") or ()
    where = f" at character {loc[1]}" if len(loc) > 1 and isinstance(loc[1], int) else ""
    reason = str((error.get("ctx") or {}).get("error") or "malformed JSON")
    return (f"the request body is not valid JSON: {reason[:1].lower() + reason[1:]}{where}; send one JSON object, "
            'e.g. {"model": "...", "messages": [{"role": "user", "content": "hi"}]}, with Content-Type: '
            "application/json")
