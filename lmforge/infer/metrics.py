"""Prometheus metrics for the server: requests, tokens, queue depth and latency histograms.

Each app gets its own registry, so several servers (or tests) in one process do not collide.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from lmforge.infer.engine import Engine

# Seconds: sub-millisecond steps of tiny models up to minutes-long generations.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, engine: Engine) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("lmforge_requests", "HTTP API requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("lmforge_prompt_tokens", "Prompt tokens submitted to the engine", registry=r)
        self.tokens = Counter("lmforge_generation_tokens", "Tokens generated", registry=r)
        Gauge("lmforge_queue_depth", "Requests waiting for a batch row", registry=r).set_function(
            lambda: len(engine.waiting))
        Gauge("lmforge_running_requests", "Requests in the running batch", registry=r).set_function(
            lambda: len(engine.running))
        self.ttft = Histogram("lmforge_time_to_first_token_seconds", "Time from request to its first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("lmforge_inter_token_latency_seconds", "Time between consecutive tokens of a request",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("lmforge_request_latency_seconds", "Time from request to its last token",
                                 buckets=_LATENCY_BUCKETS, registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
