"""The batches training reads: windows of a packed token stream, SFT windows, labelled texts.

Each loader has `next_batch() -> (x, y)` and `state_dict`/`load_state_dict`, and its order depends on
(seed, epoch) alone, so a resumed run reads exactly the batches the uninterrupted one would have.
`batches_per_epoch` lets the loop turn `--epochs` into steps, `tokens_per_epoch` (real tokens, all
ranks) turns `--max-tokens` into them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lmforge.data.pack import PackedDataset
from lmforge.data.sft import Example
from lmforge.errors import ConfigError, DataError
from lmforge.model.heads import pad_batch
from lmforge.train.losses import IGNORE_INDEX


def next_positions(epoch: int, offset: int, epoch_items: Callable[[int], int], batch_size: int, rank: int,
                   world_size: int) -> tuple[list[tuple[int, int]], int, int]:
    """This rank's (epoch, item) positions in the next global micro-batch, and the (epoch, offset) after it.

    The data is one stream, epoch after epoch, each epoch `epoch_items(epoch)` items long; a global micro-batch
    is its next batch_size·world_size items and rank r takes the r-th batch_size of them. The position is
    the stream's (epoch, offset), independent of how the batch splits over ranks: a run resumed on another
    number of processes (and per-process batch) reads on exactly where the stopped one would have. A
    fresh run's epochs hold whole global batches, so its batches never straddle two epochs.
    """
    mine = []
    for k in range(batch_size * world_size):
        if offset >= epoch_items(epoch):
            epoch, offset = epoch + 1, 0
        if rank * batch_size <= k < (rank + 1) * batch_size:
            mine.append((epoch, offset))
        offset += 1
    if offset >= epoch_items(epoch):
        epoch, offset = epoch + 1, 0
    return mine, epoch, offset


def resumed_position(state: dict[str, Any], batch_size: int, world_size: int) -> tuple[int, int]:
    """(epoch, offset) of a loader state, also one saved before offsets (its index counted global batches)."""
    if "offset" in state:
        return int(state["epoch"]), int(state["offset"])
    per_batch = int(state.get("batch_size", batch_size)) * int(state.get("world_size", world_size))
    return int(state["epoch"]), int(state["index"]) * per_batch


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
    B-slice, so W ranks together see exactly the batches one process with batch B·W would see
    (`next_positions`: the position survives a change of B and W on resume).
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
        self.epoch_windows = self.batches_per_epoch * global_batch  # the run's epoch; kept on resume
        self.epoch = 0
        self.offset = 0
        self._order_epoch = -1
        self._order = np.arange(self.n_windows)

    @property
    def index(self) -> int:
        return self.offset // (self.batch_size * self.world_size)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self.shuffle and self._order_epoch != epoch:
            self._order = np.random.default_rng((self.seed, epoch)).permutation(self.n_windows)
            self._order_epoch = epoch
        return self._order

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), int64 tensors of shape [batch_size, block_size]; y is x shifted left by one token."""
        positions, self.epoch, self.offset = next_positions(self.epoch, self.offset, lambda e: self.epoch_windows,
                                                            self.batch_size, self.rank, self.world_size)
        windows = [self._epoch_order(e)[i] for e, i in positions]
        rows = np.stack([self.dataset.window(int(w) * self.block_size, self.block_size + 1) for w in windows])
        tokens = torch.from_numpy(rows.astype(np.int64))
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "index": self.index,
            "offset": self.offset,
            "epoch_windows": self.epoch_windows,
            "seed": self.seed,
            "block_size": self.block_size,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at the window after the last one read when `state` was taken, with any batch size and
        number of ranks (the run's epoch length comes with the state)."""
        if state.get("block_size") != self.block_size:
            raise DataError(
                f"cannot resume the data position: saved block_size={state.get('block_size')} but this run has "
                f"block_size={self.block_size}; resume with the same setting"
            )
        epoch, offset = resumed_position(state, self.batch_size, self.world_size)
        epoch_windows = int(state.get("epoch_windows", self.epoch_windows))
        if not 0 <= offset < epoch_windows <= self.n_windows:
            raise DataError(
                f"cannot resume the data position: window {offset} of an epoch of {epoch_windows} in a dataset of "
                f"{self.n_windows} windows; was the dataset repacked?"
            )
        self.epoch, self.offset, self.epoch_windows, self.seed = epoch, offset, epoch_windows, int(state["seed"])
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
        self.epoch, self.offset = 0, 0
        self.granule = batch_size * world_size  # epochs hold whole global batches of the run's first process count
        self._cached: dict[int, list[list[int]]] = {}
        if self.batches_per_epoch < 1:
            raise DataError(f"{len(examples)} examples make {len(self._windows())} windows of {block_size} tokens, "
                            f"fewer than one batch of {batch_size * world_size}; use a smaller --batch-size")

    def _windows(self, epoch: int | None = None) -> list[list[int]]:
        epoch = self.epoch if epoch is None else epoch
        if epoch in self._cached:
            return self._cached[epoch]
        order = (np.random.default_rng((self.seed, epoch)).permutation(len(self.examples)) if self.shuffle
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
        self._cached = {e: w for e, w in self._cached.items() if e == epoch - 1} | {epoch: windows}
        return windows

    def _usable(self, epoch: int) -> int:
        return len(self._windows(epoch)) // self.granule * self.granule

    @property
    def index(self) -> int:
        return self.offset // (self.batch_size * self.world_size)

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
        positions, self.epoch, self.offset = next_positions(self.epoch, self.offset, self._usable, self.batch_size,
                                                            self.rank, self.world_size)
        rows = [self.window(self._windows(e)[i]) for e, i in positions]
        ids, targets, positions, segments = (torch.stack(t) for t in zip(*rows))
        return {"input_ids": ids, "positions": positions, "segments": segments}, targets

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "index": self.index, "offset": self.offset, "granule": self.granule,
                "seed": self.seed, "block_size": self.block_size, "batch_size": self.batch_size, "pack": self.pack,
                "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after the last window read, with any batch size and number of ranks."""
        for key in ("seed", "block_size", "pack"):
            if state.get(key, getattr(self, key)) != getattr(self, key):
                raise ConfigError(f"cannot resume: the run used {key}={state[key]}, this loader has "
                                  f"{getattr(self, key)}")
        self.epoch, self.offset = resumed_position(state, self.batch_size, self.world_size)
        self.granule = int(state.get("granule", state.get("batch_size", self.batch_size)
                                     * state.get("world_size", self.world_size)))


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
        self.epoch_items = self.batches_per_epoch * batch_size * world_size  # the run's epoch; kept on resume
        self.epoch = self.offset = 0

    @property
    def index(self) -> int:
        return self.offset // (self.batch_size * self.world_size)

    def _order(self, epoch: int) -> np.ndarray:
        return (np.random.default_rng((self.seed, epoch)).permutation(len(self.ids)) if self.shuffle
                else np.arange(len(self.ids)))

    def next_batch(self) -> tuple[dict[str, Tensor], Tensor]:
        positions, self.epoch, self.offset = next_positions(self.epoch, self.offset, lambda e: self.epoch_items,
                                                            self.batch_size, self.rank, self.world_size)
        orders = {e: self._order(e) for e in {e for e, _ in positions}}
        rows = np.array([orders[e][i] for e, i in positions])
        return pad_batch([self.ids[i] for i in rows], self.pad_id), self.targets[torch.from_numpy(rows)]

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "index": self.index, "offset": self.offset, "epoch_items": self.epoch_items,
                "seed": self.seed, "batch_size": self.batch_size, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after the last text read, with any batch size and number of ranks."""
        self.epoch, self.offset = resumed_position(state, self.batch_size, self.world_size)
        self.epoch_items = int(state.get("epoch_items", self.epoch_items))
