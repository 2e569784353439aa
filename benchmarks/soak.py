"""Soak test of `lmforge serve`: streaming clients for a while, hostile requests among them, and what it cost.

What it measures
    `--clients` streaming /v1/completions clients loop for `--seconds` (as serve_load.py's clients), while
    `--hostile` requests are sent among them, cycling through: a body declared larger than the server's
    limit, a body that really is (sent chunked, no length), bad JSON, a prompt of a few MB (under the body
    limit, far over the context), a 10 MB prompt where the body limit allows it, wrong types, out-of-range
    token ids. Reported: streams completed and their errors, hostile requests by status class (every one
    must be a 4xx, none a 5xx), the server's resident memory (RSS) before and after, and the latency of a
    small 4-token request alone and while a 10 MB prompt is in flight (the prompt is refused from its
    length, not tokenized, so the small request should not notice it).

How
    The server runs as a separate process (`python -m lmforge serve`, its RSS read from /proc), unless
    `soak()` is called on a server already running (the test does, in-process). Without `--model`, a
    random-weight checkpoint is written as serve_load.py writes one.

Run
    nice -n 10 .venv/bin/python benchmarks/soak.py --clients 16 --seconds 30 --hostile 200
    .venv/bin/python benchmarks/soak.py --model runs/demo/model --max-request-bytes 16000000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import Stats, free_port, make_checkpoint, one_request, wait_ready

MB = 1_000_000


def rss_mb(pid: int) -> float:
    """Resident memory of process `pid` in MB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1000
    raise RuntimeError(f"no VmRSS for process {pid}")


async def raw(port: int, head: bytes, body: bytes = b"", chunks: list[bytes] | None = None) -> tuple[int, bytes]:
    """One HTTP/1.1 exchange on a fresh connection: (status, response body). A server that closes the
    connection before reading everything sent is normal for a refused upload."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        if len(body) > 1 << 20:  # as curl does for a large upload: ask first, so a refusal arrives unsent
            writer.write(head[:-2] + b"Expect: 100-continue\r\n\r\n")
            await writer.drain()
            status = (await reader.readline()).split()
            if len(status) < 2 or status[1] != b"100":
                return (int(status[1]) if len(status) > 1 else 0), await reader.read()
            await reader.readline()  # the blank line after "100 Continue"
            head = b""
        writer.write(head + body)
        if chunks is not None:
            for chunk in chunks:
                writer.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                try:
                    await writer.drain()
                except (ConnectionError, OSError):
                    break
            else:
                writer.write(b"0\r\n\r\n")
        with contextlib.suppress(ConnectionError, OSError):
            await writer.drain()
        status = (await reader.readline()).split()
        answer = await reader.read()
        return (int(status[1]) if len(status) > 1 else 0), answer
    except (ConnectionError, OSError):
        return 0, b""
    finally:
        writer.close()


def post(path: str, length: int | None, chunked: bool = False) -> bytes:
    size = b"Transfer-Encoding: chunked\r\n" if chunked else f"Content-Length: {length}\r\n".encode()
    return (f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n".encode() + size
            + b"Connection: close\r\n\r\n")


def hostile_requests(model: str, limit: int) -> list[tuple[str, bytes, bytes, list[bytes] | None]]:
    """(kind, head, body, chunks) for each kind of hostile request, in the order they are cycled."""
    def send(path: str, data: bytes) -> tuple[bytes, bytes, None]:
        return post(path, len(data)), data, None

    def as_json(payload: dict[str, Any]) -> bytes:
        return json.dumps(payload).encode()

    huge = "the cat " * max(1, (limit - 200) // 8)  # a few MB: under the body limit, far over any context
    opening = b'{"model": "' + model.encode() + b'", "prompt": "'
    return [
        ("declared_too_large", post("/v1/completions", 64 * limit), b"{", None),
        ("chunked_too_large", post("/v1/completions", None, chunked=True), b"",
         [opening] + [b"x" * 65536] * (limit // 65536 + 2)),
        ("bad_json", *send("/v1/completions", opening + b'hi", "max_tokens": 4,')),
        ("huge_prompt", *send("/v1/completions", as_json({"model": model, "prompt": huge, "max_tokens": 4}))),
        ("huge_chat", *send("/v1/chat/completions",
                            as_json({"model": model, "messages": [{"role": "user", "content": huge}]}))),
        ("wrong_type", *send("/v1/completions", as_json({"model": model, "prompt": "hi", "max_tokens": "lots"}))),
        ("bad_token_ids", *send("/v1/completions", as_json({"model": model, "prompt": [1, 2, 10**9]}))),
    ]


async def small_request_latency(port: int, model: str) -> float:
    body = json.dumps({"model": model, "prompt": "the cat", "max_tokens": 4, "temperature": 0}).encode()
    start = time.perf_counter()
    status, _ = await raw(port, post("/v1/completions", len(body)), body)
    if status != 200:
        raise RuntimeError(f"the small request got {status}")
    return time.perf_counter() - start


async def latency_beside(port: int, model: str, prompt_bytes: int, repeats: int = 3) -> dict[str, Any]:
    """Median latency of the small request alone, and while a `prompt_bytes` prompt is being sent and refused."""
    alone = [await small_request_latency(port, model) for _ in range(repeats)]
    big = json.dumps({"model": model, "prompt": "x" * prompt_bytes, "max_tokens": 4}).encode()
    beside, statuses = [], []
    for _ in range(repeats):
        task = asyncio.create_task(raw(port, post("/v1/completions", len(big)), big))
        await asyncio.sleep(0.05)  # the big body is on its way (or being checked) when the small one starts
        beside.append(await small_request_latency(port, model))
        statuses.append((await task)[0])
    return {"alone_s": statistics.median(alone), "beside_s": statistics.median(beside),
            "big_prompt_bytes": prompt_bytes, "big_prompt_status": statuses}


async def soak_async(port: int, *, model: str, clients: int, seconds: float, hostile: int, limit: int,
                     max_tokens: int) -> dict[str, Any]:
    stats = Stats()
    body = {"model": model, "prompt": "the model learns to predict the next", "max_tokens": max_tokens,
            "temperature": 1.0, "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
    deadline = time.perf_counter() + seconds

    async def streamer() -> None:
        while time.perf_counter() < deadline:
            await one_request(port, body, stats)

    kinds = hostile_requests(model, limit)
    statuses: Counter[str] = Counter()
    by_kind: dict[str, Counter[int]] = {k[0]: Counter() for k in kinds}

    async def attacker() -> None:
        gap = seconds / max(1, hostile)
        for i in range(hostile):
            kind, head, payload, chunks = kinds[i % len(kinds)]
            status, _ = await raw(port, head, payload, chunks)
            by_kind[kind][status] += 1
            statuses[f"{status // 100}xx" if status else "closed"] += 1
            await asyncio.sleep(gap * 0.5)

    await asyncio.gather(*(streamer() for _ in range(clients)), attacker())
    return {"streams": stats.requests, "stream_errors": stats.errors, "tokens": stats.tokens,
            "hostile": dict(statuses), "hostile_by_kind": {k: dict(v) for k, v in by_kind.items()},
            "5xx": statuses.get("5xx", 0)}


def soak(port: int, *, pid: int, model: str = "bench", clients: int = 16, seconds: float = 30.0, hostile: int = 200,
         limit: int = 4 << 20, max_tokens: int = 16, probe_bytes: int = 10 * MB) -> dict[str, Any]:
    """Soak the server on `port` (process `pid`, for its RSS); returns every figure the report prints."""
    asyncio.run(soak_async(port, model=model, clients=1, seconds=1.0, hostile=0, limit=limit,
                           max_tokens=max_tokens))  # warm-up: thread pools, allocator, first batch shapes
    before = rss_mb(pid)
    result = asyncio.run(soak_async(port, model=model, clients=clients, seconds=seconds, hostile=hostile,
                                    limit=limit, max_tokens=max_tokens))
    result["rss_before_probe_mb"] = rss_mb(pid)
    result["latency"] = asyncio.run(latency_beside(port, model, probe_bytes))
    time.sleep(1.0)  # the server hands memory back once the last response is sent
    result["rss_before_mb"], result["rss_after_mb"] = before, rss_mb(pid)
    return result


def report(result: dict[str, Any], clients: int, seconds: float) -> str:
    lat = result["latency"]
    lines = [
        f"{clients} streaming clients for {seconds:.0f} s: {result['streams']} streams, {result['tokens']} tokens, "
        f"{result['stream_errors']} errors",
        f"hostile requests: {result['hostile']} (5xx: {result['5xx']})",
        *(f"  {kind:<20} {dict(sorted(counts.items()))}" for kind, counts in result["hostile_by_kind"].items()),
        f"server RSS: {result['rss_before_mb']:.0f} MB before, {result['rss_before_probe_mb']:.0f} MB after the "
        f"soak, {result['rss_after_mb']:.0f} MB after three {lat['big_prompt_bytes'] / MB:.0f} MB prompts",
        f"4-token request: {1e3 * lat['alone_s']:.0f} ms alone, {1e3 * lat['beside_s']:.0f} ms beside a "
        f"{lat['big_prompt_bytes'] / MB:.0f} MB prompt (answered {lat['big_prompt_status']})",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="checkpoint dir; default a random one")
    parser.add_argument("--preset", default="gpt2-tiny")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--hostile", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-request-bytes", type=int, default=None, help="passed to serve (default: serve's)")
    parser.add_argument("--probe-mb", type=float, default=10.0, help="the big prompt beside the small request")
    args = parser.parse_args()
    from lmforge.infer.limits import MAX_REQUEST_BYTES

    limit = args.max_request_bytes or MAX_REQUEST_BYTES
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or make_checkpoint(Path(tmp), args.preset)
        port = free_port()
        extra = ["--max-request-bytes", str(limit)] if args.max_request_bytes else []
        proc = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", "--model", str(model), "--port", str(port),
                                 "--name", "bench", *extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env={**os.environ})
        try:
            wait_ready(port, proc)
            result = soak(port, pid=proc.pid, clients=args.clients, seconds=args.seconds, hostile=args.hostile,
                          limit=limit, max_tokens=args.max_tokens, probe_bytes=int(args.probe_mb * MB))
            print(report(result, args.clients, args.seconds))
            print(json.dumps(result, default=str))
        finally:
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
