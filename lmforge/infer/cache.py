"""A KV cache with one row per running sequence, each row at its own length (continuous batching), and how
long its rows may be on this machine."""

from __future__ import annotations

import os

import torch
from torch import Tensor

from lmforge.config import ModelConfig

GiB = 1 << 30
CACHE_MEMORY_FRACTION = 0.25  # of the memory free at start: room for weights' activations, other processes


def kv_bytes(config: ModelConfig, slots: int, length: int, dtype: torch.dtype) -> int:
    """Bytes of keys and values for `slots` rows of `length` positions (what SlotCache allocates)."""
    per_position = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim
    return per_position * slots * length * torch.empty((), dtype=dtype).element_size()


def available_memory(device: torch.device) -> int:
    """Bytes free for a new cache: the accelerator's free memory, else the host's available memory
    (psutil when installed, else /proc/meminfo's MemAvailable, else sysconf's available pages)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def plan_max_model_len(config: ModelConfig, slots: int, device: torch.device, dtype: torch.dtype,
                       fraction: float = CACHE_MEMORY_FRACTION) -> int:
    """The longest row such that `slots` rows fit `fraction` of the free memory, at most the model's context.

    A 131k-context model would otherwise ask for its full context per row: Llama-3.2-1B's shape in fp32
    with 16 rows is 128 GiB of cache. Lengths below the context are rounded down to a multiple of 256.
    """
    context = config.max_position_embeddings
    per_position = kv_bytes(config, slots, 1, dtype)
    length = int(available_memory(device) * fraction) // max(per_position, 1)
    if length >= context:
        return context
    return length - length % 256 if length > 256 else length


class SlotCache:
    """Preallocated keys/values [slots, kv_heads, max_length, head_dim] per layer.

    Implements the decoder's KVCache protocol (`update`, `length`, `advance`). The engine calls
    `prepare` before each forward to say which rows run and where each writes; rows may be at different
    lengths (their stale tail is masked out by the engine's attention mask). Running rows are kept
    contiguous from slot 0, so `update` returns views, never copies of the cache.
    """

    def __init__(self, config: ModelConfig, slots: int, max_length: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        self.config, self.device, self.dtype = config, torch.device(device), dtype
        self.keys, self.values = self._zeros(slots, max_length), self._zeros(slots, max_length)
        self.slots, self.max_length = slots, max_length
        self.length = 0  # what the decoder reads: the longest row's cached length before this forward
        self._rows = slice(0, 1)
        self._start: int | None = 0
        self._row_index: Tensor | None = None
        self._pos_index: Tensor | None = None
        self._span = 0

    def _zeros(self, slots: int, length: int) -> list[Tensor]:
        shape = (slots, self.config.num_key_value_heads, length, self.config.head_dim)
        # zeros, not empty: masked keys still multiply their (zero) probability by V, and 0·NaN is NaN
        return [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in range(self.config.num_hidden_layers)]

    @property
    def nbytes(self) -> int:
        return kv_bytes(self.config, self.slots, self.max_length, self.dtype)

    def resize(self, slots: int, max_length: int) -> None:
        """Grow to `slots` rows of `max_length` positions, keeping what the current rows hold."""
        if (slots, max_length) == (self.slots, self.max_length):
            return
        keep_rows, keep_len = min(slots, self.slots), min(max_length, self.max_length)
        for store in (self.keys, self.values):
            for layer, old in enumerate(store):
                new = torch.zeros((slots, old.shape[1], max_length, old.shape[3]), device=old.device, dtype=old.dtype)
                new[:keep_rows, :, :keep_len] = old[:keep_rows, :, :keep_len]
                store[layer] = new
        self.slots, self.max_length = slots, max_length

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

    def move(self, src: int, dst: int | slice, length: int) -> None:
        """Copy row `src`'s first `length` positions into row(s) `dst` (filling a hole a finished request
        left, or giving every beam of a new beam search its prompt)."""
        for keys, values in zip(self.keys, self.values):
            keys[dst, :, :length] = keys[src, :, :length]
            values[dst, :, :length] = values[src, :, :length]

    def reorder(self, first: int, order: Tensor, length: int) -> None:
        """Rows first + i become copies of rows first + order[i] (beam search keeping its best continuations)."""
        n = order.numel()
        for keys, values in zip(self.keys, self.values):
            keys[first:first + n, :, :length] = keys[first + order, :, :length]
            values[first:first + n, :, :length] = values[first + order, :, :length]
