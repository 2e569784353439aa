"""A KV cache with one row per running request, each row at its own length (continuous batching)."""

from __future__ import annotations

import torch
from torch import Tensor

from lmforge.config import ModelConfig


class SlotCache:
    """Preallocated keys/values [slots, kv_heads, max_length, head_dim] per layer, allocated once.

    Implements the decoder's KVCache protocol (`update`, `length`, `advance`). The engine calls
    `prepare` before each forward to say which rows run and where each writes; rows may be at different
    lengths (their stale tail is masked out by the engine's attention mask). Running rows are kept
    contiguous from slot 0, so `update` returns views, never copies of the cache.
    """

    def __init__(self, config: ModelConfig, slots: int, max_length: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        shape = (slots, config.num_key_value_heads, max_length, config.head_dim)
        # zeros, not empty: masked keys still multiply their (zero) probability by V, and 0·NaN is NaN
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.slots, self.max_length = slots, max_length
        self.length = 0  # what the decoder reads: the longest row's cached length before this forward
        self._rows = slice(0, 1)
        self._start: int | None = 0
        self._row_index: Tensor | None = None
        self._pos_index: Tensor | None = None
        self._span = 0

    def prepare(self, rows: slice, starts: list[int], new: int) -> None:
        """The next forward feeds `new` positions to each row in `rows`, row i writing from starts[i]."""
        self._rows = rows
        first = starts[0]
        if all(s == first for s in starts):
            self._start = first
        else:
            if new != 1:
                raise ValueError("rows at different lengths can only advance one position at a time")
            device = self.keys[0].device
            self._start = None
            self._row_index = torch.arange(rows.start, rows.stop, device=device)
            self._pos_index = torch.tensor(starts, device=device)
        self.length = max(starts)
        self._span = self.length + new
        if self._span > self.max_length:
            raise ValueError(f"KV cache holds {self.max_length} positions; {self._span} requested")

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        keys, values = self.keys[layer], self.values[layer]
        if self._start is not None:
            keys[self._rows, :, self._start:self._start + k.shape[2]] = k
            values[self._rows, :, self._start:self._start + v.shape[2]] = v
        else:
            keys[self._row_index, :, self._pos_index] = k[:, :, 0]
            values[self._row_index, :, self._pos_index] = v[:, :, 0]
        return keys[self._rows, :, :self._span], values[self._rows, :, :self._span]

    def advance(self, n: int) -> None:
        """Lengths are per row and kept by the engine; nothing to do here."""

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy row `src`'s first `length` positions into row `dst` (filling the hole a finished request left)."""
        for keys, values in zip(self.keys, self.values):
            keys[dst, :, :length] = keys[src, :, :length]
            values[dst, :, :length] = values[src, :, :length]

    def reorder(self, order: Tensor, length: int) -> None:
        """Rows 0..len(order)-1 become copies of rows `order` (beam search keeping the best continuations)."""
        n = order.numel()
        for keys, values in zip(self.keys, self.values):
            keys[:n, :, :length] = keys[order, :, :length]
            values[:n, :, :length] = values[order, :, :length]
