"""Inference: the batching engine, sampling, beam search, the HTTP server, terminal and web chat."""

from lmforge.infer.engine import Engine, Output, Request, TokenLogprob
from lmforge.infer.sampling import SamplingParams

__all__ = ["Engine", "Output", "Request", "SamplingParams", "TokenLogprob"]
