"""The batches training reads: windows of a packed token stream, SFT windows, labelled texts.

Each loader has `next_batch() -> (x, y)` and `state_dict`/`load_state_dict`, and its order depends on
(seed, epoch) alone, so a resumed run reads exactly the batches the uninterrupted one would have.
`batches_per_epoch` lets the loop turn `--epochs` into steps, `tokens_per_epoch` (real tokens, all
ranks) turns `--max-tokens` into them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lmforge.data.pack import PackedDataset
from lmforge.data.sft import Example
from lmforge.errors import ConfigError, DataError
from lmforge.model.heads import pad_batch
from lmforge.train.losses import IGNORE_INDEX


def real_tokens(x: Tensor | dict[str, Tensor], y: Tensor) -> Tensor:
    """The tokens a batch really holds, for tokens/s, MFU and --max-tokens: a text batch's unpadded tokens
    (its attention mask), otherwise its targets that are not IGNORE_INDEX (padding and prompts are not)."""
    if isinstance(x, dict) and "attention_mask" in x and x["attention_mask"].dim() == 2:
        return x["attention_mask"].sum()
    return (y != IGNORE_INDEX).sum()


class WindowLoader:
    """Batches of (block_size + 1)-token windows, every window once per epoch, shardable over ranks.

    Window k covers tokens [k·block_size, (k+1)·block_size]; x is its first block_size tokens and y
    the last block_size, so y[t] is the token after x[t]. Each epoch's order is a permutation drawn from
    (seed, epoch) alone; global batch i is its windows [i·B·W, (i+1)·B·W) and rank r takes the r-th
    B-slice, so W ranks together see exactly the batches one process with batch B·W would see.
    """

    def __init__(
        self,
        dataset: PackedDataset,
        block_size: int,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
    ):
        if block_size < 1 or batch_size < 1 or world_size < 1:
            raise ConfigError(
                f"block_size={block_size}, batch_size={batch_size}, world_size={world_size} must all be >= 1"
            )
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank={rank} must be in [0, world_size={world_size})")
        self.dataset = dataset
        self.block_size, self.batch_size = block_size, batch_size
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.n_windows = (dataset.num_tokens - 1) // block_size
        global_batch = batch_size * world_size
        if self.n_windows < global_batch:
            per_rank = f" ({batch_size} per rank × {world_size} ranks)" if world_size > 1 else ""
            raise DataError(
                f"{dataset.path} ({dataset.split} split): {dataset.num_tokens} tokens is smaller than "
                f"one batch of {global_batch}×{block_size}-token windows{per_rank}; "
                "use a smaller --block-size/--batch-size or more data"
            )
        self.batches_per_epoch = self.n_windows // global_batch
        self.tokens_per_epoch = self.batches_per_epoch * global_batch * block_size
        self.epoch = 0
        self.index = 0
        self._order_epoch = -1
        self._order = np.arange(self.n_windows)

    def _epoch_order(self) -> np.ndarray:
        if self.shuffle and self._order_epoch != self.epoch:
            self._order = np.random.default_rng((self.seed, self.epoch)).permutation(self.n_windows)
            self._order_epoch = self.epoch
        return self._order

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), int64 tensors of shape [batch_size, block_size]; y is x shifted left by one token."""
        start = self.index * self.batch_size * self.world_size + self.rank * self.batch_size
        windows = self._epoch_order()[start : start + self.batch_size]
        rows = np.stack([self.dataset.window(int(w) * self.block_size, self.block_size + 1) for w in windows])
        tokens = torch.from_numpy(rows.astype(np.int64))
        self.index += 1
        if self.index >= self.batches_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "index": self.index,
            "seed": self.seed,
            "block_size": self.block_size,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at the batch after the one last returned when `state` was taken."""
        for key in ("block_size", "batch_size", "world_size"):
            if state.get(key) != getattr(self, key):
                raise DataError(
                    f"cannot resume the data position: saved {key}={state.get(key)} but this run has "
                    f"{key}={getattr(self, key)}; resume with the same setting"
                )
        index = int(state["index"])
        if not 0 <= index < self.batches_per_epoch:
            raise DataError(
                f"cannot resume the data position: batch {index} of an epoch of {self.batches_per_epoch}; "
                "was the dataset repacked?"
            )
        self.epoch, self.index, self.seed = int(state["epoch"]), index, int(state["seed"])
        self._order_epoch = -1


class SFTLoader:
    """Batches of SFT windows: examples in a seeded order per epoch, packed next-fit into `block_size` tokens.

    x is a dict: input_ids, positions (restart at 0 per example) and segments (1, 2, ... per example, 0
    for padding); y holds the next token where it is a target, IGNORE_INDEX elsewhere. With pack=False
    each window holds one example. The order, hence the packing, depends on (seed, epoch) alone, so the
    state (epoch, index) resumes at the exact batch.
    """

    def __init__(self, examples: list[Example], block_size: int, batch_size: int, pad_id: int, *, seed: int = 0,
                 pack: bool = True, shuffle: bool = True, rank: int = 0, world_size: int = 1) -> None:
        if block_size < 2 or batch_size < 1:
            raise ConfigError(f"block_size={block_size} must be at least 2 and batch_size={batch_size} at least 1")
        too_long = [i for i, e in enumerate(examples) if len(e.ids) - 1 > block_size]
        if too_long:
            raise ConfigError(f"example {too_long[0]} has {len(examples[too_long[0]].ids)} tokens, more than "
                              f"block_size+1={block_size + 1}; load it with max_length=block_size+1")
        self.examples, self.block_size, self.batch_size, self.pad_id = examples, block_size, batch_size, pad_id
        self.seed, self.pack, self.shuffle, self.rank, self.world_size = seed, pack, shuffle, rank, world_size
        self.epoch, self.index = 0, 0
        self._cached: tuple[int, list[list[int]]] | None = None
        if self.batches_per_epoch < 1:
            raise DataError(f"{len(examples)} examples make {len(self._windows())} windows of {block_size} tokens, "
                            f"fewer than one batch of {batch_size * world_size}; use a smaller --batch-size")

    def _windows(self) -> list[list[int]]:
        if self._cached is not None and self._cached[0] == self.epoch:
            return self._cached[1]
        order = (np.random.default_rng((self.seed, self.epoch)).permutation(len(self.examples)) if self.shuffle
                 else np.arange(len(self.examples)))
        windows: list[list[int]] = []
        used = self.block_size
        for i in map(int, order):
            n = len(self.examples[i].ids) - 1
            if self.pack and used + n <= self.block_size:
                windows[-1].append(i)
                used += n
            else:
                windows.append([i])
                used = n
        self._cached = (self.epoch, windows)
        return windows

    @property
    def batches_per_epoch(self) -> int:
        return len(self._windows()) // (self.batch_size * self.world_size)

    @property
    def tokens_per_epoch(self) -> int:
        return sum(sum(e.trained[1:]) for e in self.examples)

    def window(self, members: list[int]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        T = self.block_size
        ids = torch.full((T,), self.pad_id, dtype=torch.long)
        targets = torch.full((T,), IGNORE_INDEX, dtype=torch.long)
        positions = torch.zeros(T, dtype=torch.long)
        segments = torch.zeros(T, dtype=torch.long)
        at = 0
        for seg, i in enumerate(members, start=1):
            ex = self.examples[i]
            n = len(ex.ids) - 1
            tokens = torch.tensor(ex.ids)
            ids[at:at + n] = tokens[:-1]
            targets[at:at + n] = torch.where(torch.tensor(ex.trained[1:]), tokens[1:], IGNORE_INDEX)
            positions[at:at + n] = torch.arange(n)
            segments[at:at + n] = seg
            at += n
        return ids, targets, positions, segments

    def next_batch(self) -> tuple[dict[str, Tensor], Tensor]:
        windows = self._windows()
        start = self.index * self.batch_size * self.world_size + self.rank * self.batch_size
        rows = [self.window(w) for w in windows[start:start + self.batch_size]]
        self.index += 1
        if self.index >= self.batches_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        ids, targets, positions, segments = (torch.stack(t) for t in zip(*rows))
        return {"input_ids": ids, "positions": positions, "segments": segments}, targets

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "block_size": self.block_size,
                "batch_size": self.batch_size, "pack": self.pack, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("seed", "block_size", "batch_size", "pack", "world_size"):
            if state.get(key, getattr(self, key)) != getattr(self, key):
                raise ConfigError(f"cannot resume: the run used {key}={state[key]}, this loader has "
                                  f"{getattr(self, key)}")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


class LabelledLoader:
    """Batches of right-padded texts with their targets, in a seeded order per epoch (resumable).

    Rank r of W takes the r-th slice of each global batch of W·batch_size, as the pretraining loader does.
    """

    def __init__(self, ids: list[list[int]], targets: Tensor, batch_size: int, pad_id: int, *, seed: int = 0,
                 shuffle: bool = True, block_size: int = 256, rank: int = 0, world_size: int = 1) -> None:
        if len(ids) < batch_size * world_size:
            raise DataError(f"{len(ids)} examples are fewer than one batch of {batch_size * world_size}; "
                            "use a smaller --batch-size")
        self.ids, self.targets, self.batch_size, self.pad_id = ids, targets, batch_size, pad_id
        self.seed, self.shuffle, self.block_size = seed, shuffle, block_size
        self.rank, self.world_size = rank, world_size
        self.batches_per_epoch = len(ids) // (batch_size * world_size)
        self.tokens_per_epoch = sum(map(len, ids))
        self.epoch = self.index = 0

    def next_batch(self) -> tuple[dict[str, Tensor], Tensor]:
        order = (np.random.default_rng((self.seed, self.epoch)).permutation(len(self.ids)) if self.shuffle
                 else np.arange(len(self.ids)))
        start = (self.index * self.world_size + self.rank) * self.batch_size
        rows = order[start:start + self.batch_size]
        self.index += 1
        if self.index >= self.batches_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        return pad_batch([self.ids[i] for i in rows], self.pad_id), self.targets[torch.from_numpy(rows)]

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
