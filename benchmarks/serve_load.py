"""Load test of `lmforge serve`: 1, 4, 16 and 64 concurrent streaming clients on loopback.

What it measures
    For each concurrency level, clients loop for `--seconds`, each sending streaming /v1/completions
    requests (`--max-tokens` tokens, sampled, `ignore_eos` so every request generates the same number)
    one after another. Reported per level: aggregate generated tokens/s (from each response's usage
    chunk), p50/p99 time to first token, p50/p99 inter-token latency (between consecutive text events of
    one response), requests completed, and errors (any non-200 status, error event, or broken stream).
    The ratio that shows continuous batching at work is aggregate tokens/s at 16 clients over 1 client.

How
    The server runs as a separate process (`python -m lmforge serve`) so the clients' event loop does not
    share its interpreter. Clients are plain asyncio HTTP/1.1 connections reading server-sent events, so
    the load generator itself stays cheap. Without `--model`, a random-weight checkpoint of
    `--preset` (default: the nanoGPT shape, 6 layers × 384) with a freshly trained 1024-token BPE
    tokenizer is written to a temporary directory.

Run
    .venv/bin/python benchmarks/serve_load.py                         # ~1.5 min
    .venv/bin/python benchmarks/serve_load.py --model runs/x --levels 1,16 --seconds 30
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Stats:
    tokens: int = 0
    requests: int = 0
    errors: int = 0
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)


def make_checkpoint(out: Path, preset_name: str) -> Path:
    """A random-weight model with a small BPE tokenizer trained on synthetic text."""
    from lmforge.config import preset
    from lmforge.lm import LM
    from lmforge.model.gpt import GPT
    from lmforge.tokenizer import Tokenizer, train_tokenizer

    rng = random.Random(0)
    words = ["the", "a", "model", "token", "learns", "to", "predict", "next", "word", "from", "context", "and",
             "data", "batch", "layer", "head"]
    corpus = out / "corpus.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    with open(corpus, "w") as f:
        for _ in range(2000):
            f.write(json.dumps({"text": " ".join(rng.choices(words, k=rng.randint(5, 30)))}) + "\n")
    tok = Tokenizer.load(train_tokenizer(corpus, out / "tok", vocab_size=1024))
    model = GPT(preset(preset_name, vocab_size=tok.vocab_size, max_position_embeddings=512)).eval()
    return LM(model, tok, {"max_new_tokens": 64}).save(out / "ckpt")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def one_request(port: int, body: dict, stats: Stats) -> None:
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        payload = json.dumps(body).encode()
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(payload)).encode() + b"\r\nConnection: close\r\n\r\n" + payload)
        await writer.drain()
        status = (await reader.readline()).split()
        if len(status) < 2 or status[1] != b"200":
            stats.errors += 1
            return
        last, usage, done = None, None, False
        while line := await reader.readline():
            if not line.startswith(b"data: "):
                continue
            data = line[6:].strip()
            if data == b"[DONE]":
                done = True
                break
            event = json.loads(data)
            if "error" in event:
                stats.errors += 1
                return
            if event.get("usage"):
                usage = event["usage"]["completion_tokens"]
            if any(c.get("text") for c in event.get("choices", [])):
                now = time.perf_counter()
                if last is None:
                    stats.ttft.append(now - start)
                else:
                    stats.itl.append(now - last)
                last = now
        if not done or usage is None:
            stats.errors += 1
            return
        stats.tokens += usage
        stats.requests += 1
    except (OSError, ValueError):
        stats.errors += 1
    finally:
        writer.close()


async def client(port: int, body: dict, deadline: float, stats: Stats) -> None:
    while time.perf_counter() < deadline:
        await one_request(port, body, stats)


async def level(port: int, clients: int, seconds: float, body: dict) -> tuple[Stats, float]:
    stats = Stats()
    start = time.perf_counter()
    await asyncio.gather(*(client(port, body, start + seconds, stats) for _ in range(clients)))
    return stats, time.perf_counter() - start


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


def wait_ready(port: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the server exited during startup")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("the server did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="checkpoint dir; default a random one")
    parser.add_argument("--preset", default="nanogpt-shakespeare")
    parser.add_argument("--levels", default="1,4,16,64")
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or make_checkpoint(Path(tmp), args.preset)
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", "--model", str(model), "--port", str(port),
                                 "--name", "bench", "--max-batch", str(args.max_batch)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ})
        try:
            wait_ready(port, proc)
            body = {"model": "bench", "prompt": "the model learns to predict the next", "max_tokens": args.max_tokens,
                    "temperature": 1.0, "stream": True, "ignore_eos": True,
                    "stream_options": {"include_usage": True}}
            asyncio.run(level(port, 1, 2.0, body))  # warm-up: thread pools, allocator
            print(f"{args.max_tokens} tokens per request, {args.seconds:.0f} s per level, max batch {args.max_batch}")
            print(f"{'clients':>7} {'tok/s':>8} {'x 1-client':>10} {'TTFT p50':>9} {'p99':>7} {'ITL p50':>8} "
                  f"{'p99':>7} {'requests':>8} {'errors':>6}")
            base = None
            for n in (int(x) for x in args.levels.split(",")):
                stats, elapsed = asyncio.run(level(port, n, args.seconds, body))
                rate = stats.tokens / elapsed
                base = base or rate
                print(f"{n:>7} {rate:>8.1f} {rate / base:>9.2f}x {1e3 * pct(stats.ttft, 50):>7.0f}ms "
                      f"{1e3 * pct(stats.ttft, 99):>5.0f}ms {1e3 * pct(stats.itl, 50):>6.1f}ms "
                      f"{1e3 * pct(stats.itl, 99):>5.1f}ms {stats.requests:>8} {stats.errors:>6}", flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
