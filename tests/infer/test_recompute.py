"""Models without a KV cache (LSTM, n-gram) decode through the one engine by recomputing from their tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmforge.infer.engine import Engine, Request
from lmforge.infer.sampling import SamplingParams
from lmforge.lm import LM
from lmforge.model.lstm import LSTMLM, LSTMConfig
from lmforge.model.ngram import NgramLM
from lmforge.tokenizer import Tokenizer


def lstm(vocab: int) -> LSTMLM:
    torch.manual_seed(0)
    model = LSTMLM(LSTMConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, max_position_embeddings=64))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)  # logits that differ by token, so greedy paths are not all alike
    return model.eval()


def ngram(vocab: int) -> NgramLM:
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, min(vocab, 60), size=4000)
    tokens[::7] = (tokens[::7] * 3 + 1) % 60  # some structure for the higher orders to find
    return NgramLM.fit(tokens, 3, vocab, max_position_embeddings=64)


def greedy_by_hand(model: torch.nn.Module, prompt: list[int], steps: int) -> list[int]:
    """The definition: run the model over everything so far, take the argmax, repeat."""
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("build", [lstm, ngram], ids=["lstm", "ngram"])
def test_greedy_decoding_equals_recomputing_by_hand(build, tiny_tokenizer: Tokenizer) -> None:
    """Prompts of different lengths decoded together in one engine (rows at different positions) each give
    the tokens that recomputing the whole sequence and taking the argmax gives."""
    model = build(tiny_tokenizer.vocab_size)
    engine = Engine(model, max_batch=4, eos_id=None)
    prompts = [[5, 17, 33], [40, 2, 9, 11, 19, 27, 3], [8]]
    requests = [engine.add(Request(p, SamplingParams(max_new_tokens=9, temperature=0.0))) for p in prompts]
    while engine.has_work:
        engine.step()
    for prompt, request in zip(prompts, requests):
        assert request.output_ids == greedy_by_hand(model, prompt, 9)


@pytest.mark.parametrize("build", [lstm, ngram], ids=["lstm", "ngram"])
def test_generate_stream_and_beams_through_lm(build, tiny_tokenizer: Tokenizer) -> None:
    """LM.generate / stream / beam search work on a cacheless model: streamed pieces join to the completion,
    a seeded sample repeats, and a 3-beam search scores at least the greedy sequence's log-probability."""
    lm = LM(build(tiny_tokenizer.vocab_size), tiny_tokenizer, {"max_new_tokens": 8, "temperature": 1.0})
    text = lm.generate("the cat", max_new_tokens=8, seed=3, stop_at_eos=False)
    assert "".join(lm.stream("the cat", max_new_tokens=8, seed=3, stop_at_eos=False)) == text
    assert lm.generate(["the cat", "a dog sat"], max_new_tokens=8, seed=3, stop_at_eos=False)[0] == text

    @torch.no_grad()
    def logprob(completion_ids: list[int], prompt_ids: list[int]) -> float:
        ids = torch.tensor([prompt_ids + completion_ids])
        logp = torch.log_softmax(lm.model(ids[:, :-1]).double(), -1)[0, len(prompt_ids) - 1:]
        return float(logp.gather(-1, torch.tensor(completion_ids)[:, None]).sum())

    prompt = tiny_tokenizer.encode("the cat")
    greedy = greedy_by_hand(lm.model, prompt, 4)
    engine = Engine(lm.model, max_batch=3, eos_id=None)
    beam = engine.add(Request(prompt, SamplingParams(max_new_tokens=4, num_beams=3, length_penalty=0.0,
                                                     stop_at_eos=False)))
    while engine.has_work:
        engine.step()
    assert len(beam.output_ids) == 4
    assert logprob(beam.output_ids, prompt) >= logprob(greedy, prompt) - 1e-6


def test_prompt_logprobs_equal_one_forward(tiny_tokenizer: Tokenizer) -> None:
    """echo + logprobs (what loglikelihood evaluation over HTTP needs) on a cacheless model: each prompt
    token's logprob is the forward pass's log-softmax at the position before it."""
    model = lstm(tiny_tokenizer.vocab_size)
    engine = Engine(model, max_batch=2, eos_id=None)
    ids = [3, 14, 15, 92, 65, 35]
    request = engine.add(Request(ids, SamplingParams(max_new_tokens=0), prompt_logprobs=0))
    outputs = []
    while engine.has_work:
        outputs += engine.step()
    scored = [e.logprob for e in outputs[-1].prompt_logprobs[1:]]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids[:-1]])).double(), -1)[0]
    assert scored == pytest.approx(logp.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].tolist(), abs=1e-5)
    assert request.finished
