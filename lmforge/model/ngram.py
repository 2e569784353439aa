"""An n-gram language model over token ids: interpolated modified Kneser–Ney (Chen & Goodman 1998).

For a history h (the last n−1 tokens) and its shorter history h′ (h without its oldest token),

    p(w | h) = max(c(hw) − D(c(hw)), 0) / c(h·)  +  γ(h) · p(w | h′)                  (C&G eq. 17)
    γ(h)     = (D₁·N₁(h·) + D₂·N₂(h·) + D₃₊·N₃₊(h·)) / c(h·)

c is the raw count at the highest order and, at every lower order, the continuation count N₁₊(·hw): how
many distinct tokens precede hw (Kneser & Ney 1995), so a token that is frequent only after one word
("Francisco") does not get a large share of the backed-off mass. N_r(h·) counts the tokens that follow h
with count r, c(h·) = Σ_w c(hw), and a history never seen (c(h·) = 0) defers to h′ entirely. The recursion
ends below the unigrams with the uniform distribution over the whole vocabulary, so no token has zero
probability. Each order's three discounts come from its count-of-counts n_r (C&G eq. 26):

    Y = n₁ / (n₁ + 2n₂),   D₁ = 1 − 2Y·n₂/n₁,   D₂ = 2 − 3Y·n₃/n₂,   D₃₊ = 3 − 4Y·n₄/n₃

With `discount=d` every count of every order is discounted by the same d: interpolated Kneser–Ney as
Kneser & Ney define it, the estimator NLTK's `KneserNeyInterpolated` implements.

It is an `nn.Module` so everything that consumes a language model takes it unchanged: `forward(ids [B, T])`
returns log p(· | the n−1 tokens up to each position) [B, T, V] — the perplexity scorer, `LM.logprobs`, the
evaluation harness and the inference engine (which, as the model keeps no KV cache, recomputes from the last
`history` = n−1 tokens; see `lmforge.infer.recompute`).

Storage: for each order k the sorted keys of the k-grams seen and their counts, as non-trainable integer
parameters, so they go into model.safetensors like any weights. A k-gram's key is (id of its first k−1
tokens in the (k−1)-gram table) · V + its last token: keys sort by history, one history's continuations are
one contiguous run, and finding a history of any length is a chain of binary searches, vectorized over positions.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lmforge.config import config_from_dict, read_config_json
from lmforge.errors import ConfigError

NGRAM_MODEL_TYPE = "lmforge-ngram"
NGRAM_NAME = re.compile(r"^ngram-([1-9])$")  # `--model ngram-5`: a 5-gram model
CHUNK = 512  # positions scored together: [CHUNK, V] probabilities at a time


def ngram_order(name: Any) -> int | None:
    """The order n of a model name like "ngram-5", None for any other name."""
    match = NGRAM_NAME.match(str(name)) if name is not None else None
    return int(match.group(1)) if match else None


@dataclass
class NgramConfig:
    """What an n-gram checkpoint's config.json holds: the order, the vocabulary, each order's table size
    (to allocate before loading) and discounts [D₁, D₂, D₃₊] (order 1 first), and how they were chosen.

    max_position_embeddings is the longest input the scorer and the engine feed at once; the model itself
    reads only the last n−1 tokens, so any value works.
    """

    vocab_size: int = 8192
    order: int = 5
    sizes: list[int] = field(default_factory=list)
    discounts: list[list[float]] = field(default_factory=list)
    smoothing: str = "modified-kneser-ney"  # or "kneser-ney": one discount for every count
    max_position_embeddings: int = 256
    family: str = "ngram"

    def __post_init__(self) -> None:
        if not 1 <= self.order <= 9:
            raise ConfigError(f"order={self.order} must be between 1 and 9")
        if self.vocab_size < 1 or self.max_position_embeddings < 1:
            raise ConfigError("vocab_size and max_position_embeddings must be at least 1")
        for name in ("sizes", "discounts"):
            if getattr(self, name) and len(getattr(self, name)) != self.order:
                raise ConfigError(f"{name} has {len(getattr(self, name))} entries for order={self.order}")

    def to_dict(self) -> dict[str, Any]:
        return {"architectures": ["LMForgeNgram"], "model_type": NGRAM_MODEL_TYPE, **dataclasses.asdict(self)}

    @classmethod
    def load(cls, path: str | Path) -> NgramConfig:
        return config_from_dict(cls, read_config_json(Path(path)), str(path))

    def replace(self, **changes: Any) -> NgramConfig:
        return dataclasses.replace(self, **changes)


def modified_discounts(counts: np.ndarray) -> list[float]:
    """[D₁, D₂, D₃₊] from the count-of-counts of one order (Chen & Goodman eq. 26).

    Where a count-of-count the formula divides by is zero (a tiny corpus), every count gets Ney et al.'s
    single estimate Y = n₁/(n₁ + 2n₂) instead (0.5 if even that is undefined). Each D_r stays in [0, r]
    so no discounted count goes negative.
    """
    n1, n2, n3, n4 = (int(np.count_nonzero(counts == r)) for r in (1, 2, 3, 4))
    y = n1 / (n1 + 2 * n2) if n1 + 2 * n2 else 0.5
    if min(n1, n2, n3, n4) == 0:
        return [min(y, 1.0)] * 3
    raw = (1 - 2 * y * n2 / n1, 2 - 3 * y * n3 / n2, 3 - 4 * y * n4 / n3)
    return [float(min(max(d, 0.0), r)) for r, d in zip((1, 2, 3), raw)]


def count_ngrams(tokens: np.ndarray, order: int, vocab_size: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(keys, counts) per order 1..n over one token stream: raw counts at order n, continuation counts below."""
    tokens = np.asarray(tokens, dtype=np.int64)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise ConfigError(f"token ids must be in [0, {vocab_size}); found {tokens.min()}..{tokens.max()}")
    keys, raw, ids = [], [], []  # ids[k-1][i]: table index of the k-gram starting at position i
    for k in range(1, order + 1):
        n = len(tokens) - k + 1
        if n < 1:
            raise ConfigError(f"{len(tokens)} tokens are too few for a {order}-gram model")
        key = tokens if k == 1 else ids[-1][:n] * vocab_size + tokens[k - 1:]
        table, index, count = np.unique(key, return_inverse=True, return_counts=True)
        keys.append(table)
        raw.append(count)
        ids.append(index.reshape(-1))
    counts = []
    for k in range(1, order):
        # N₁₊(·g): the distinct (k+1)-grams ending in g; the (k+1)-gram at position i ends in the k-gram at i+1
        _, first = np.unique(ids[k], return_index=True)
        counts.append(np.bincount(ids[k - 1][first + 1], minlength=len(keys[k - 1])))
    counts.append(raw[-1])
    return keys, counts


class NgramLM(nn.Module):
    """The n-gram model; see the module docstring. Build it with `NgramLM.fit(tokens, order, vocab_size)`."""

    kv_cache = False  # decoded by recomputing from the token history (lmforge.infer.recompute)

    def __init__(self, config: NgramConfig) -> None:
        super().__init__()
        if len(config.sizes) != config.order or len(config.discounts) != config.order:
            raise ConfigError("an n-gram config needs sizes and discounts for every order; build one with "
                              "`lmforge pretrain --model ngram-N` or NgramLM.fit")
        self.config = config
        self.history = config.order - 1
        for k, size in enumerate(config.sizes, start=1):
            # The counts are the model's parameters; integer tensors, never trained.
            self.register_parameter(f"keys_{k}", nn.Parameter(torch.zeros(size, dtype=torch.long), requires_grad=False))
            self.register_parameter(f"counts_{k}", nn.Parameter(torch.zeros(size, dtype=torch.long),
                                                                requires_grad=False))
        self._derived: tuple[tuple[int, ...], list[dict[str, Tensor]]] | None = None

    @classmethod
    def fit(cls, tokens: np.ndarray, order: int, vocab_size: int, *, discount: float | None = None,
            max_position_embeddings: int = 256) -> NgramLM:
        """Count a token stream; `discount` = one D for every count, else modified KN's three per order."""
        if discount is not None and not 0 < discount <= 1:
            raise ConfigError(f"discount={discount} must be in (0, 1]")
        keys, counts = count_ngrams(tokens, order, vocab_size)
        discounts = [[float(discount)] * 3 if discount is not None else modified_discounts(c) for c in counts]
        config = NgramConfig(vocab_size=vocab_size, order=order, sizes=[len(k) for k in keys], discounts=discounts,
                             smoothing="kneser-ney" if discount is not None else "modified-kneser-ney",
                             max_position_embeddings=max_position_embeddings)
        model = cls(config)
        with torch.no_grad():
            for k in range(1, order + 1):
                getattr(model, f"keys_{k}").copy_(torch.from_numpy(keys[k - 1]))
                getattr(model, f"counts_{k}").copy_(torch.from_numpy(counts[k - 1].astype(np.int64)))
        return model.eval()

    def num_params(self) -> int:
        """Stored counts (what the model "learned"), for the summary lines other models print."""
        return sum(p.numel() for p in self.parameters()) // 2

    def _tables(self) -> list[dict[str, Tensor]]:
        """Per order: keys, α of each n-gram, γ and the start of each history's run; computed from the counts
        once (and again if they change, e.g. after load_weights)."""
        versions = tuple(p._version for p in self.parameters())
        if self._derived is not None and self._derived[0] == versions:
            return self._derived[1]
        V = self.config.vocab_size
        tables = []
        for k in range(1, self.config.order + 1):
            # on the CPU wherever the parameters are: lookups and scatters, no matrix work for an accelerator
            keys, counts = getattr(self, f"keys_{k}").detach().cpu(), getattr(self, f"counts_{k}").detach().cpu()
            by_count = torch.tensor([0.0, *self.config.discounts[k - 1]], dtype=torch.float64)  # D(0) = 0
            discount = by_count[counts.clamp(max=3)]
            histories = 1 if k == 1 else self.config.sizes[k - 2]
            history = keys // V if k > 1 else torch.zeros_like(keys)
            total = torch.zeros(histories, dtype=torch.float64).index_add_(0, history, counts.double())
            mass = torch.zeros(histories, dtype=torch.float64).index_add_(0, history, discount)
            seen = total > 0
            safe = torch.where(seen, total, 1.0)
            alpha = (counts.double() - discount).clamp(min=0) / safe[history]
            gamma = torch.where(seen, mass / safe, 1.0)  # an unseen history defers to the shorter one
            starts = torch.searchsorted(keys, torch.arange(histories + 1, dtype=torch.long) * V) if k > 1 else None
            tables.append({"keys": keys, "alpha": alpha, "gamma": gamma, "starts": starts})
        unigram = torch.full((V,), float(tables[0]["gamma"][0]) / V, dtype=torch.float64)
        unigram.index_add_(0, tables[0]["keys"], tables[0]["alpha"])
        tables[0]["dense"] = unigram
        self._derived = (versions, tables)
        return tables

    def _history_ids(self, idx: Tensor) -> list[Tensor]:
        """ids[m][b, t]: the table index of the m-token history ending at position t, −1 where unseen or
        the row has fewer than m tokens up to t (m = 1..n−1)."""
        tables, V = self._tables(), self.config.vocab_size
        B, T = idx.shape
        out: list[Tensor] = []
        grams = None  # grams[b, s]: the index of the m-gram starting at s
        for m in range(1, self.config.order):
            keys = tables[m - 1]["keys"]
            key = idx if m == 1 else torch.where(grams[:, :-1] >= 0, grams[:, :-1] * V + idx[:, m - 1:], -1)
            pos = torch.searchsorted(keys, key.clamp(min=0)).clamp(max=max(len(keys) - 1, 0))
            found = (key >= 0) & (keys[pos] == key) if len(keys) else torch.zeros_like(key, dtype=torch.bool)
            grams = torch.where(found, pos, -1)
            ending = torch.full((B, T), -1, dtype=torch.long, device=idx.device)
            ending[:, m - 1:] = grams  # the m-gram starting at s ends at s + m − 1
            out.append(ending)
        return out

    @torch.no_grad()
    def forward(self, idx: Tensor, cache: Any = None, **_: Any) -> Tensor:
        """log p(next token | the n−1 tokens up to each position) [B, T, V], float32."""
        tables = self._tables()
        device = idx.device
        idx = idx.cpu().long()
        B, T = idx.shape
        histories = [h.reshape(-1) for h in self._history_ids(idx)]
        out = torch.empty(B * T, self.config.vocab_size, dtype=torch.float32)
        for begin in range(0, B * T, CHUNK):
            rows = slice(begin, min(begin + CHUNK, B * T))
            self._log_probabilities(tables, [h[rows] for h in histories], out[rows])
        return out.reshape(B, T, -1).to(device)

    def _log_probabilities(self, tables: list[dict[str, Tensor]], histories: list[Tensor], out: Tensor) -> None:
        """log p(· | h) into `out` [P, V], unrolled from the top order down: p = Σ_k (Π_{j>k} γ_j) α_k + Π γ · p_low.

        p_low, the bigram distribution (the unigram one where the last token was never seen), is dense: built
        once per distinct one-token history in the chunk and shared by the positions that have it (a short
        history has thousands of continuations, and few distinct ones occur). Each higher order adds only the
        continuations seen after each position's history (a handful for a long history), weighted by the
        γ's above it. The sums are float64, the [P, V] rows float32 (memory bandwidth is the cost here).
        """
        V, order, P = self.config.vocab_size, self.config.order, out.shape[0]
        weight = torch.ones(P, dtype=torch.float64)
        rows_k, tokens_k, values_k = [], [], []
        for k in range(order, 2, -1):
            table, history = tables[k - 1], histories[k - 2]
            rows = (history >= 0).nonzero()[:, 0]
            which, tokens, alpha = _continuations(table, history[rows], V)
            rows_k.append(rows[which])
            tokens_k.append(tokens)
            values_k.append(weight[rows[which]] * alpha)
            weight[rows] *= table["gamma"][history[rows]]
        unigram = tables[0]["dense"]
        if order > 1:  # row 0: no one-token history seen, the unigram distribution; then one per distinct history
            distinct, inverse = torch.unique(histories[0].clamp(min=-1), return_inverse=True)
            seen = distinct >= 0
            low = torch.empty(len(distinct), V, dtype=torch.float64)
            low[~seen] = unigram
            low[seen] = tables[1]["gamma"][distinct[seen]][:, None] * unigram[None, :]
            which, tokens, alpha = _continuations(tables[1], distinct[seen], V)
            low.index_put_((seen.nonzero()[:, 0][which], tokens), alpha, accumulate=True)
            torch.index_select(low.float(), 0, inverse, out=out)
        else:
            out.copy_(unigram.float().expand(P, V))
        out.mul_(weight.float()[:, None])
        if rows_k:
            out.index_put_((torch.cat(rows_k), torch.cat(tokens_k)), torch.cat(values_k).float(), accumulate=True)
        out.log_()


def _continuations(table: dict[str, Tensor], histories: Tensor, V: int) -> tuple[Tensor, Tensor, Tensor]:
    """Every n-gram that continues one of `histories`: (which history, its last token, its α)."""
    starts = table["starts"][histories]
    lengths = table["starts"][histories + 1] - starts
    which = torch.repeat_interleave(lengths)
    first = lengths.cumsum(0) - lengths
    entries = starts[which] + torch.arange(len(which)) - first[which]
    return which, table["keys"][entries] % V, table["alpha"][entries]
