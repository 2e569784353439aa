"""Decoding models that keep no KV cache — the LSTM and n-gram baselines — by recomputing from their tokens.

The engine's cache holds, per row, what the model needs to continue that row: for a Transformer the keys and
values of every layer, for these models only the row's token ids. `TokenCache` is that cache, with the
interface the engine drives `SlotCache` through (prepare, move, reorder, resize), and `Recompute` wraps the
model: each forward writes the new tokens into their rows and runs the model over each row's history — its
last `model.history` tokens (n−1 for an n-gram), or all of them (an LSTM's state depends on every token).
Batching, beams, stop strings, penalties and sampling stay the engine's, so these models generate, stream,
chat and serve like any other. An LSTM pays O(length) per token instead of O(1); at the baselines' sizes
and contexts that is milliseconds, and it keeps one engine for every model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


def keeps_kv_cache(model: nn.Module) -> bool:
    """Whether a model decodes through a KV cache (`kv_cache = False` on the class says it does not)."""
    return getattr(model, "kv_cache", True)


class TokenCache:
    """Token ids [slots, max_length] per running row; the engine's cache interface over ids, not K/V."""

    def __init__(self, slots: int, max_length: int, device: torch.device | str = "cpu") -> None:
        self.ids = torch.zeros(slots, max_length, dtype=torch.long, device=device)
        self.slots, self.max_length = slots, max_length
        self.rows = slice(0, 0)
        self.starts: list[int] = []
        self.length = 0

    @property
    def nbytes(self) -> int:
        return self.ids.numel() * self.ids.element_size()

    def resize(self, slots: int, max_length: int) -> None:
        if (slots, max_length) == (self.slots, self.max_length):
            return
        ids = torch.zeros(slots, max_length, dtype=torch.long, device=self.ids.device)
        rows, length = min(slots, self.slots), min(max_length, self.max_length)
        ids[:rows, :length] = self.ids[:rows, :length]
        self.ids, self.slots, self.max_length = ids, slots, max_length

    def prepare(self, rows: slice, starts: list[int], new: int) -> None:
        """The next forward feeds `new` tokens to each row in `rows`, row i from position starts[i]."""
        if max(starts) + new > self.max_length:
            raise ValueError(f"token cache holds {self.max_length} positions; {max(starts) + new} requested")
        self.rows, self.starts, self.length = rows, list(starts), max(starts)

    def move(self, src: int, dst: int | slice, length: int) -> None:
        self.ids[dst, :length] = self.ids[src, :length]

    def reorder(self, first: int, order: Tensor, length: int) -> None:
        n = order.numel()
        self.ids[first:first + n, :length] = self.ids[first + order.to(self.ids.device), :length]


class Recompute(nn.Module):
    """The engine's view of a cacheless model: `forward(idx, cache, ...)` as a Transformer's, logits of the
    fed positions [B, new, V], computed from each row's token history in `cache`."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config
        self.history: int | None = getattr(model, "history", None)  # tokens it reads; None: all

    def forward(self, idx: Tensor, cache: TokenCache, *, positions: Any = None, attention_mask: Any = None
                ) -> Tensor:
        B, new = idx.shape
        first = cache.rows.start
        for i, start in enumerate(cache.starts):
            cache.ids[first + i, start:start + new] = idx[i]
        if all(s == 0 for s in cache.starts):  # a prefill: the prompt is the whole history
            return self.model(idx)
        begins = [0 if self.history is None else max(0, s + 1 - self.history) for s in cache.starts]
        width = max(s + new - b for s, b in zip(cache.starts, begins))
        windows = torch.zeros(B, width, dtype=torch.long, device=idx.device)
        for i, (start, begin) in enumerate(zip(cache.starts, begins)):
            # right-padded: a causal model's earlier positions never see the padding after them
            windows[i, :start + new - begin] = cache.ids[first + i, begin:start + new]
        logits = self.model(windows)
        at = torch.tensor([s - b for s, b in zip(cache.starts, begins)], device=logits.device)
        index = (at[:, None] + torch.arange(new, device=logits.device)[None, :])[:, :, None]
        return logits.gather(1, index.expand(-1, -1, logits.shape[-1]))
