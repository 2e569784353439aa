"""A decode step compiled by inductor: one graph for the whole forward of every running row's next token.

Eager decoding of a small model spends most of a token outside the matrix products: ~30 PyTorch calls
per layer, each a few microseconds of dispatch, and oneDNN's batch-1 bf16 product streams weights at
about half the memory bandwidth on this CPU (11 GB/s against 24 GB/s for a plain read). Compiling the
step with inductor's `max_autotune` and `freezing` fuses the norms, rotary and residual adds into a few
C++ loops and picks its own AMX/AVX-512 matrix-vector kernels for the frozen weights: on a 30M Llama
(512 wide, 8 layers) this decoded 273 tokens/s against the eager engine's 113 and llama.cpp's 283
(`benchmarks/decode.py`).

The number of rows and the attended length are dynamic (marked so from the first call), so neither a
growing sequence nor a batch that grows and shrinks recompiles: one graph serves one row, and one every
larger batch (dynamo specializes a size of 1); the weight shapes stay static, which is what inductor's
matrix kernels need. The cache is the engine's preallocated `SlotCache`, written in place inside the graph.

The price is the compile: 20-90 s on 2 cores, less when inductor's on-disk cache holds the kernels. Worth
it for a server or a long generation, not a one-line completion: hence opt-in (`compile=True`).
The eager engine stays the reference; tests check the compiled step gives its tokens.
"""

from __future__ import annotations

import logging
import time
import types
import warnings

import torch
import torch._inductor.config
from torch import Tensor, nn

from lmforge.infer.cache import SlotCache
from lmforge.model.gpt import causal_mask

log = logging.getLogger("lmforge.infer")

INDUCTOR_OPTIONS = {"max_autotune": True}
# Read where `options` does not reach: weights become constants (freezing), autotuning stays quiet.
INDUCTOR_CONFIG = {"freezing": True, "autotune_num_choices_displayed": 0, "max_autotune_report_choices_stats": False}


class _InPlace:
    """The KVCache protocol over a SlotCache inside the graph: write each row's key/value at its position,
    return the first `span` positions of the first `rows` rows."""

    length = 0  # positions are passed explicitly; the model only reads this for its context check

    def __init__(self, cache: SlotCache, positions: Tensor, keys: Tensor) -> None:
        self.cache, self.positions, self.keys = cache, positions, keys
        self.rows = torch.arange(positions.shape[0], device=positions.device)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        keys, values = self.cache.keys[layer], self.cache.values[layer]
        keys[self.rows, :, self.positions] = k[:, :, 0]
        values[self.rows, :, self.positions] = v[:, :, 0]
        n, span = self.rows.shape[0], self.keys.shape[0]
        return keys[:n, :, :span], values[:n, :, :span]

    def advance(self, n: int) -> None:
        pass


class CompiledStep:
    """`step(idx [B, 1], positions [B])` → logits [B, vocab] for a decoder over `cache`, compiled.

    Equivalent to the eager engine's decode forward with a causal (and sliding-window) mask; rows are at
    their own positions. Built once per engine; weights are frozen into the graph, so `stale` tells the
    engine when an optimizer step has changed them and the step must be rebuilt.
    """

    def __init__(self, model: nn.Module, cache: SlotCache) -> None:
        self.model, self.cache = model, cache
        self.window = getattr(model.config, "sliding_window", None)
        self.versions = tuple(p._version for p in model.parameters())
        # dynamo keeps its graphs on the function's code object: a copy per step keeps each engine's graphs
        # (and their guards on this model's weights) apart from every other's, and gone with it
        code = CompiledStep._forward.__code__.replace(co_name=f"_forward_{id(self):x}")
        forward = types.MethodType(types.FunctionType(code, globals()), self)
        self._compiled = torch.compile(forward, fullgraph=True, dynamic=False, options=INDUCTOR_OPTIONS)
        self._compiled_once = False

    @property
    def stale(self) -> bool:
        return tuple(p._version for p in self.model.parameters()) != self.versions

    def _forward(self, idx: Tensor, positions: Tensor, keys: Tensor) -> Tensor:
        mask = causal_mask(positions[:, None], keys[None, :], self.window)[:, None, None, :]
        view = _InPlace(self.cache, positions, keys)
        hidden = self.model.hidden(idx, view, positions=positions[:, None], attention_mask=mask)
        return self.model.lm_head(hidden[:, -1])

    def __call__(self, idx: Tensor, positions: Tensor) -> Tensor:
        keys = torch.arange(int(positions.max()) + 1, device=idx.device)
        for dynamic in (idx, positions, keys):  # rows and attended length vary: one graph for all of them
            torch._dynamo.mark_dynamic(dynamic, 0)
        start = time.perf_counter() if not self._compiled_once else None
        with torch._inductor.config.patch(INDUCTOR_CONFIG), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's own deprecation notices while it compiles, not the user's
            logits = self._compiled(idx, positions, keys)
        if start is not None:
            self._compiled_once = True
            log.info("compiled the decode step in %.1f s", time.perf_counter() - start)
        return logits
