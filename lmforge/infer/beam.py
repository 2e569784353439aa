"""Beam search (the decoder's half of Sutskever et al. 2014; Wu et al. 2016 for the length penalty).

Keeps the `num_beams` most likely partial continuations by summed log-probability. A beam that ends
(end-of-sequence, or the token budget) is scored sum(log p) / length**length_penalty, so a penalty
above 0 stops short endings from winning merely by having fewer negative terms. The bookkeeping follows
Hugging Face transformers' `generate(num_beams=...)` with its default `early_stopping=False`, so the two
pick the same sequence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.infer.cache import SlotCache
from lmforge.infer.sampling import SamplingParams

_DEAD = -1.0e9  # transformers' score for "not a candidate"


@torch.inference_mode()
def beam_search(model: nn.Module, prompt_ids: list[int], params: SamplingParams, end_ids: set[int],
                max_new: int) -> list[int]:
    """The best continuation of `prompt_ids` (without its end token) found with `params.num_beams` beams;
    a beam ends at any of `end_ids` or after `max_new` tokens."""
    if max_new <= 0:
        return []
    beams, lp = params.num_beams, params.length_penalty
    ends = set(end_ids)
    end_ids = torch.tensor(sorted(ends), dtype=torch.long)  # the search bookkeeping runs on the CPU
    weight = next(model.parameters())
    n = len(prompt_ids)
    cache = SlotCache(model.config, beams, n + max_new, weight.device, weight.dtype)
    idx = torch.tensor([prompt_ids], device=weight.device).expand(beams, n)
    cache.prepare(slice(0, beams), [0] * beams, n)
    logits = model(idx, cache, positions=torch.arange(n, device=weight.device))[:, -1]
    running_scores = torch.full((beams,), _DEAD)
    running_scores[0] = 0.0  # all beams start identical: let only the first expand at step one
    running: list[list[int]] = [[] for _ in range(beams)]
    finished: list[tuple[float, list[int]]] = []
    keep = max(2, 1 + len(ends)) * beams  # enough candidates that `beams` of them do not end here
    improvable = True
    for step in range(max_new):
        logp = F.log_softmax(logits.float().cpu(), dim=-1) + running_scores[:, None]
        vocab = logp.shape[-1]
        top_scores, top_index = logp.view(-1).topk(min(keep, logp.numel()))
        origin, tokens = (top_index // vocab).tolist(), (top_index % vocab).tolist()
        ended = torch.isin(top_index % vocab, end_ids) if ends else torch.zeros(len(tokens), dtype=torch.bool)
        if step + 1 == max_new:
            ended[:] = True
        if improvable:  # only the best `beams` candidates may finish; scores divided by length**penalty
            for j in range(beams):
                if ended[j]:
                    seq = running[origin[j]] + [tokens[j]]
                    finished.append((top_scores[j].item() / (step + 1) ** lp, seq))
            finished = sorted(finished, key=lambda f: -f[0])[:beams]
        alive = top_scores + ended.float() * _DEAD
        next_scores, pick = alive.topk(beams)
        running = [running[origin[j]] + [tokens[j]] for j in pick.tolist()]
        running_scores = next_scores
        if improvable and len(finished) == beams:
            best_possible = running_scores[0].item() / (step + 1) ** lp
            improvable = best_possible > finished[-1][0]
        if not improvable or bool(ended.all()) or step + 1 == max_new:
            break
        order = torch.tensor([origin[j] for j in pick.tolist()], device=weight.device)
        length = n + step
        cache.reorder(order, length)
        cache.prepare(slice(0, beams), [length] * beams, 1)
        feed = torch.tensor([[seq[-1]] for seq in running], device=weight.device)
        logits = model(feed, cache, positions=torch.full((beams, 1), length, device=weight.device))[:, -1]
    best = finished[0][1] if finished else running[0]
    return best[:-1] if best and best[-1] in ends else best
