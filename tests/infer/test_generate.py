import math
from types import SimpleNamespace

import conftest
import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers
from torch import Tensor, nn

from lmforge.errors import ConfigError
from lmforge.infer.decode import (
    SamplingParams,
    apply_repetition_penalty,
    generate,
    generate_tokens,
    sample_next,
    stream,
    top_p_filter,
)
from lmforge.model.gpt import GPT
from lmforge.tokenizer import SPECIAL_TOKENS, Tokenizer

CORPUS = [
    "Hello world. The end of the story is near.",
    "The quick brown fox jumps over the lazy dog.",
    "def main():\n    return 42\n",
    "café, naïve, 漢字, emoji 😀 and more text here.",
] * 4

PROMPT = [5, 17, 42, 99, 3, 250, 7]


def byte_level_tokenizer(vocab_size: int) -> Tokenizer:
    """GPT-2 style byte-level BPE; vocab_size 261 (256 bytes + 5 specials) leaves one token per byte."""
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(CORPUS, trainer=trainer)
    return Tokenizer(hf)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return byte_level_tokenizer(300)


def random_gpt(name: str, vocab_size: int = 300, std: float | None = 0.3, **overrides) -> GPT:
    """conftest's random preset with this file's byte-level vocabulary by default."""
    return conftest.random_gpt(name, vocab_size, std=std, **overrides)


def greedy_without_cache(model: GPT, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):
            next_id = model(ids)[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
    return ids[0, len(prompt):].tolist()


class ScriptedModel(nn.Module):
    """Stands in for GPT: whatever the input, the next token is the next one of `script`, then eos.

    It speaks the engine's protocol (explicit positions, a cache it never reads): the prefill is the
    forward whose positions start at 0, and later steps count positions from there.
    """

    def __init__(self, script: list[int], vocab_size: int, eos_id: int, context: int = 256) -> None:
        super().__init__()
        self.script, self.vocab_size, self.eos_id = script, vocab_size, eos_id
        self.config = SimpleNamespace(max_position_embeddings=context, num_hidden_layers=1, num_key_value_heads=1,
                                      head_dim=2, vocab_size=vocab_size)
        self.anchor = nn.Parameter(torch.zeros(()))  # the engine reads the device and dtype from a parameter
        self.prompt_length = 0

    def forward(self, idx: Tensor, cache=None, *, positions: Tensor, attention_mask=None) -> Tensor:
        last = int(positions.reshape(-1)[-1])
        if int(positions.reshape(-1)[0]) == 0:
            self.prompt_length = idx.shape[1]
        step = last + 1 - self.prompt_length
        target = self.script[step] if step < len(self.script) else self.eos_id
        logits = torch.full((idx.shape[0], idx.shape[1], self.vocab_size), float("-inf"))
        logits[:, -1, target] = 0.0
        return logits


def scripted(tokenizer: Tokenizer, text: str) -> ScriptedModel:
    return ScriptedModel(tokenizer.encode(text), tokenizer.vocab_size, tokenizer.eos_id)


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny", "qwen3-tiny"])
def test_cached_greedy_equals_uncached_greedy(name):
    """Decoding through the KV cache picks the same tokens as re-running the whole sequence each step."""
    model = random_gpt(name).double()  # float64: no near-tie can flip between the two paths
    params = SamplingParams(max_new_tokens=24, temperature=0, stop_at_eos=False)
    cached = list(generate_tokens(model, PROMPT, params))
    assert cached == greedy_without_cache(model, PROMPT, 24)
    assert len(set(cached)) > 3


def test_same_seed_same_sample_different_seed_different():
    model = random_gpt("qwen3-tiny", std=None)
    def run(seed):
        return list(generate_tokens(model, PROMPT, SamplingParams(max_new_tokens=24, seed=seed,
                                                                               stop_at_eos=False)))
    assert run(0) == run(0)
    assert run(0) != run(1)


@pytest.mark.parametrize("filters", [{"top_k": 1}, {"top_p": 1e-6}])
def test_keeping_one_token_equals_greedy(filters):
    model = random_gpt("qwen3-tiny", std=None)
    greedy = list(generate_tokens(model, PROMPT, SamplingParams(max_new_tokens=20, temperature=0,
                                                                stop_at_eos=False)))
    sampled = list(generate_tokens(model, PROMPT, SamplingParams(max_new_tokens=20, temperature=1.5, seed=0,
                                                                 stop_at_eos=False, **filters)))
    assert sampled == greedy


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0]])
    seen = torch.tensor([[0, 1, 1]])
    penalized = apply_repetition_penalty(logits, seen, 2.0)
    assert penalized.tolist() == [[1.0, -2.0, 0.5, -3.0]]
    assert logits.tolist() == [[2.0, -1.0, 0.5, -3.0]]


def test_repetition_penalty_changes_the_greedy_choice():
    logits = torch.tensor([[3.0, 2.0, -1.0]])
    params = SamplingParams(temperature=0, repetition_penalty=2.0)
    assert sample_next(logits, params, seen=torch.tensor([[0]])).tolist() == [1]
    assert sample_next(logits, params, seen=torch.tensor([[2]])).tolist() == [0]


@pytest.mark.parametrize("top_p, kept", [(0.4, {1}), (0.75, {1, 3}), (0.85, {1, 3, 0}), (1.0, {0, 1, 2, 3})])
def test_nucleus_keeps_smallest_set_reaching_top_p(top_p, kept):
    logits = torch.tensor([[0.15, 0.5, 0.05, 0.3]]).log()
    assert set(top_p_filter(logits, top_p).isfinite().nonzero()[:, 1].tolist()) == kept
    params = SamplingParams(top_p=top_p)
    draws = sample_next(logits.expand(4000, -1), params, torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == kept


@pytest.mark.parametrize("text, stop, expected", [
    ("Hello world. The end of the story is near.", ["story", "end of"], "Hello world. The "),
    ("The end is near. The end of it.", ["end of"], "The end is near. The "),
    ("Hello world.", ["o"], "Hell"),
])
def test_stop_string_ends_output_before_it(tokenizer, text, stop, expected):
    """Text that might start a stop string is held back, then released once ruled out."""
    params = SamplingParams(stop=stop)
    pieces = list(stream(scripted(tokenizer, text), tokenizer, "x", params))
    assert "".join(pieces) == expected
    assert generate(scripted(tokenizer, text), tokenizer, "x", params) == expected


def test_incomplete_stop_string_prefix_is_emitted_at_the_end(tokenizer):
    text = "Hello world. The end"
    params = SamplingParams(stop=["end of"])
    assert generate(scripted(tokenizer, text), tokenizer, "x", params) == text


def test_stream_without_stop_yields_pieces_as_tokens_arrive(tokenizer):
    text = "The quick brown fox jumps over the lazy dog."
    pieces = list(stream(scripted(tokenizer, text), tokenizer, "x", SamplingParams()))
    assert "".join(pieces) == text
    assert len(pieces) == len(tokenizer.encode(text))


def test_stream_concatenates_to_generate_with_a_real_model(tokenizer):
    model = random_gpt("llama-tiny", vocab_size=tokenizer.vocab_size, std=None)
    params = SamplingParams(max_new_tokens=30, seed=3, stop_at_eos=False)
    text = generate(model, tokenizer, "The quick", params)
    assert "".join(stream(model, tokenizer, "The quick", params)) == text
    tokens = list(generate_tokens(model, tokenizer.encode("The quick"), params))
    assert text == tokenizer.decode(tokens, skip_special_tokens=True)


def test_streamed_pieces_never_split_a_multibyte_character():
    tokenizer = byte_level_tokenizer(256 + len(SPECIAL_TOKENS))
    text = "é漢😀"
    assert len(tokenizer.encode(text)) == len(text.encode())
    pieces = list(stream(scripted(tokenizer, text), tokenizer, "x", SamplingParams()))
    assert pieces == ["é", "漢", "😀"]


@pytest.mark.parametrize("field, value", [
    ("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("top_k", 0),
    ("repetition_penalty", 0.0), ("max_new_tokens", -1), ("stop", [""]),
])
def test_bad_sampling_params_name_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        SamplingParams(**{field: value})


def test_prompt_longer_than_context_keeps_its_end():
    """Prompt + max_new_tokens over the context: the oldest prompt tokens are dropped to make room."""
    model = random_gpt("gpt2-tiny", max_position_embeddings=32)
    params = SamplingParams(max_new_tokens=8, temperature=0, stop_at_eos=False)
    prompt = list(range(10, 60))
    with pytest.warns(UserWarning, match="keeping the last 24"):
        out = list(generate_tokens(model, prompt, params))
    assert out == list(generate_tokens(model, prompt[-24:], params))


def test_max_new_tokens_beyond_context_stops_when_context_is_full():
    model = random_gpt("gpt2-tiny", max_position_embeddings=32)
    params = SamplingParams(max_new_tokens=100, temperature=0, stop_at_eos=False)
    with pytest.warns(UserWarning):
        out = list(generate_tokens(model, PROMPT, params))
    assert len(out) == 31


def test_empty_prompt_is_refused():
    with pytest.raises(ConfigError, match="prompt"):
        list(generate_tokens(random_gpt("gpt2-tiny"), [], SamplingParams()))


def test_stops_at_eos_without_yielding_it():
    model = ScriptedModel([7, 8, 9], vocab_size=20, eos_id=1)
    assert list(generate_tokens(model, [3], SamplingParams(), eos_id=1)) == [7, 8, 9]
    params = SamplingParams(max_new_tokens=5, stop_at_eos=False)
    assert list(generate_tokens(model, [3], params, eos_id=1)) == [7, 8, 9, 1, 1]


def test_caller_keeps_grad_mode_and_model_mode():
    """Between yields the caller's autograd state is its own, and a training model is left training."""
    model = random_gpt("gpt2-tiny", std=None).train()
    tokens = generate_tokens(model, PROMPT, SamplingParams(max_new_tokens=4))
    next(tokens)
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    list(tokens)
    assert model.training


def test_temperature_divides_the_logits():
    """At temperature 0.1 the probabilities become p^10, renormalised: 0.4 drops to about 0.017."""
    logits = torch.tensor([[math.log(0.6), math.log(0.4)]]).expand(20000, -1)
    cold = sample_next(logits, SamplingParams(temperature=0.1), torch.Generator().manual_seed(0))
    expected = 0.4**10 / (0.6**10 + 0.4**10)
    assert cold.float().mean().item() == pytest.approx(expected, abs=0.005)
