"""Beam search (the decoder's half of Sutskever et al. 2014; Wu et al. 2016 for the length penalty).

Keeps the `num_beams` most likely partial continuations by summed log-probability. A beam that ends
(end-of-sequence, or the token budget) is scored sum(log p) / length**length_penalty, so a penalty
above 0 stops short endings from winning merely by having fewer negative terms. The bookkeeping follows
Hugging Face transformers' `generate(num_beams=...)` with its default `early_stopping=False`, so the two
pick the same sequence.

The search is advanced one token per engine step over `num_beams` rows of the shared batch, so a beam
request decodes beside other requests instead of holding the engine until it ends.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lmforge.infer.sampling import SamplingParams

_DEAD = -1.0e9  # transformers' score for "not a candidate"


class BeamSearch:
    """The state of one beam search: running beams with their scores, and the best finished ones.

    Args:
        params: `num_beams` and `length_penalty` are read.
        end_ids: Tokens that end a beam (eos, special stop tokens).
        max_new: Most tokens a beam may have; every beam ends there.
        early_stopping: As transformers': False stops when the best running beam, scored at its current
            length, cannot beat the worst of `num_beams` finished ones; True as soon as `num_beams` have
            finished; "never" only when it could not beat them even at `max_new` tokens (with a length
            penalty above 0; the canonical, exhaustive search).
    """

    def __init__(self, params: SamplingParams, end_ids: set[int], max_new: int,
                 early_stopping: bool | str = False) -> None:
        self.beams, self.length_penalty, self.max_new = params.num_beams, params.length_penalty, max_new
        self.early_stopping = early_stopping
        self.ends = set(end_ids)
        self._end_ids = torch.tensor(sorted(self.ends), dtype=torch.long)  # the bookkeeping runs on the CPU
        self.scores = torch.full((self.beams,), _DEAD)
        self.scores[0] = 0.0  # all beams start identical: let only the first expand at step one
        self.running: list[list[int]] = [[] for _ in range(self.beams)]
        self.finished: list[tuple[float, list[int]]] = []
        self.keep = max(2, 1 + len(self.ends)) * self.beams  # enough candidates that `beams` of them do not end
        self.improvable = True
        self.steps = 0
        self.done = max_new <= 0

    def step(self, logits: Tensor, normalized: bool = False) -> list[int]:
        """Extend the beams by one token from their next-token logits [beams, V] ([1, V] after the prompt);
        `normalized`: they are log-probabilities already (constrained after the softmax, as transformers does).

        Returns, for each beam now running, the index of the beam it continues (the engine copies those
        cache rows); sets `done` when no running beam can beat the finished ones, or the budget is spent.
        """
        step, beams, lp = self.steps, self.beams, self.length_penalty
        logp = logits.float().cpu() if normalized else F.log_softmax(logits.float().cpu(), dim=-1)
        logp = logp.expand(beams, -1) + self.scores[:, None]
        vocab = logp.shape[-1]
        top_scores, top_index = logp.reshape(-1).topk(min(self.keep, logp.numel()))
        origin, tokens = (top_index // vocab).tolist(), (top_index % vocab).tolist()
        if self.ends:
            ended = torch.isin(top_index % vocab, self._end_ids)
        else:
            ended = torch.zeros(len(tokens), dtype=torch.bool)
        if step + 1 == self.max_new:
            ended[:] = True
        if self.improvable:  # only the best `beams` candidates may finish; scores divided by length**penalty
            for j in range(beams):
                if ended[j]:
                    self.finished.append((top_scores[j].item() / (step + 1) ** lp,
                                          self.running[origin[j]] + [tokens[j]]))
            self.finished = sorted(self.finished, key=lambda f: -f[0])[:beams]
        alive = top_scores + ended.float() * _DEAD
        self.scores, pick = alive.topk(beams)
        order = [origin[j] for j in pick.tolist()]
        self.running = [self.running[origin[j]] + [tokens[j]] for j in pick.tolist()]
        if self.improvable and len(self.finished) == beams:
            length = self.max_new if self.early_stopping == "never" and lp > 0 else step + 1
            best_possible = self.scores[0].item() / length ** lp
            self.improvable = best_possible > self.finished[-1][0] and self.early_stopping is not True
        self.steps += 1
        self.done = not self.improvable or bool(ended.all()) or self.steps == self.max_new
        return order

    @property
    def feed(self) -> list[int]:
        """Each running beam's newest token: what the next forward reads."""
        return [seq[-1] for seq in self.running]

    def best(self) -> list[int]:
        """The winning continuation, without its end token."""
        return self.n_best(1)[0]

    def n_best(self, n: int) -> list[list[int]]:
        """The `n` (at most `num_beams`) best continuations, best first, without their end tokens."""
        found = [seq for _, seq in self.finished] or [self.running[0]]
        return [seq[:-1] if seq and seq[-1] in self.ends else seq for seq in found[:max(1, n)]]
