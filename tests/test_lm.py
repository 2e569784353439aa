"""`lmforge.load` and the LM object: reproducible sampling, streaming, log-probabilities, chat, clear load errors."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import greedy_text

import lmforge
from lmforge.config import preset
from lmforge.errors import CheckpointError, ConfigError
from lmforge.lm import LM
from lmforge.tokenizer import IM_END

PROMPT = "The model learns to"
# Sampled, never stopped early by eos, so each completion is 12 real tokens of a random model.
SAMPLE = dict(max_new_tokens=12, temperature=1.0, stop_at_eos=False)


@pytest.fixture(scope="module")
def ckpt(make_checkpoint: Callable[..., Path]) -> Path:
    return make_checkpoint("gpt2-tiny")


@pytest.fixture(scope="module")
def lm(ckpt: Path) -> LM:
    return lmforge.load(ckpt, device="cpu")


def test_load_restores_the_saved_weights(ckpt: Path, lm: LM, make_lm: Callable[..., LM]) -> None:
    """The loaded model's state equals the one saved, including the tied head."""
    saved = make_lm("gpt2-tiny").model.state_dict()
    loaded = lm.model.state_dict()
    assert saved.keys() == loaded.keys()
    for name, tensor in saved.items():
        assert torch.equal(tensor, loaded[name]), name
    assert lm.model.lm_head.weight is lm.model.embed.weight


def test_generate_with_a_seed_is_reproducible(lm: LM) -> None:
    """The same seed gives the same sampled completion, from the same LM and from a fresh load."""
    first = lm.generate(PROMPT, seed=7, **SAMPLE)
    assert first
    assert lm.generate(PROMPT, seed=7, **SAMPLE) == first
    assert lmforge.load(lm.path, device="cpu").generate(PROMPT, seed=7, **SAMPLE) == first


def test_stream_pieces_join_to_generate(lm: LM) -> None:
    """The streamed pieces, concatenated, are exactly generate's string for the same seed."""
    pieces = list(lm.stream(PROMPT, seed=3, **SAMPLE))
    assert len(pieces) > 1
    assert "".join(pieces) == lm.generate(PROMPT, seed=3, **SAMPLE)


def test_logprobs_equal_log_softmax_of_a_direct_forward(lm: LM) -> None:
    """logprobs(text) = log_softmax of the model's logits at each previous position, starting after eos."""
    text = "The cat sat on the mat. 你好"
    ids = [lm.tokenizer.eos_id, *lm.tokenizer.encode(text)]
    with torch.no_grad():
        logp = F.log_softmax(lm.model(torch.tensor([ids[:-1]])).double(), dim=-1)[0]
    got = lm.logprobs(text)
    assert [token for token, _ in got] == [lm.tokenizer.decode([t]) for t in ids[1:]]
    expected = [logp[i, t].item() for i, t in enumerate(ids[1:])]
    assert [v for _, v in got] == pytest.approx(expected, abs=1e-5)
    assert all(v < 0 for _, v in got)


def test_chat_generates_from_the_chatml_rendering_and_stops_at_im_end(
        lm: LM, monkeypatch: pytest.MonkeyPatch) -> None:
    """chat() renders the messages with the template plus the assistant header and stops at <|im_end|>; its
    greedy reply is the argmax continuation of that rendering, token by token."""
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    calls = []
    original = LM.generate

    def spy(self: LM, prompt: str, **sampling: object) -> str:
        calls.append((prompt, sampling))
        return original(self, prompt, **sampling)

    monkeypatch.setattr(LM, "generate", spy)
    reply = lm.chat(messages, max_new_tokens=6, temperature=0)
    [(prompt, sampling)] = calls
    assert prompt == lm.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n" \
                     "<|im_start|>assistant\n"
    assert sampling["stop"] == [IM_END]
    stops = {lm.tokenizer.eos_id, lm.tokenizer.token_to_id(IM_END)}
    expected = greedy_text(lm.model, lm.tokenizer, lm.tokenizer.encode(prompt), 6, stops)
    assert expected and reply == expected


def test_load_without_weights_names_the_missing_file(ckpt: Path, tmp_path: Path) -> None:
    """A checkpoint directory lacking model.safetensors raises CheckpointError naming that file."""
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((ckpt / name).read_bytes())
    with pytest.raises(CheckpointError, match=r"model\.safetensors is missing"):
        lmforge.load(tmp_path)


def test_weights_of_another_architecture_are_refused(
        make_checkpoint: Callable[..., Path], tmp_path: Path, lm: LM) -> None:
    """gpt2-tiny weights under a llama-tiny config.json raise CheckpointError saying they do not match."""
    make_checkpoint("gpt2-tiny", out=tmp_path)
    llama = preset("llama-tiny", vocab_size=lm.tokenizer.vocab_size)
    (tmp_path / "config.json").write_text(json.dumps(llama.to_dict()))
    with pytest.raises(CheckpointError, match=r"do not match config\.json.*another architecture"):
        lmforge.load(tmp_path)


def test_load_of_a_missing_directory_is_a_checkpoint_error(tmp_path: Path) -> None:
    """load() of a path that is not a directory raises CheckpointError naming the path."""
    with pytest.raises(CheckpointError, match="nowhere"):
        lmforge.load(tmp_path / "nowhere")


def test_generation_reuses_one_engine_per_lm(ckpt: Path) -> None:
    """generate, stream, chat and generate([...]) all run through one engine the LM made on first use, whose
    cache grows in place for a longer request; completions equal those of a private engine per call."""
    from lmforge.infer.decode import generate_batch, stream

    lm = lmforge.load(ckpt, device="cpu")
    first = lm.generate(PROMPT, seed=7, **SAMPLE)
    engine = lm.engine
    assert engine is not None and engine.cache.max_length < lm.config.max_position_embeddings
    assert lm.generate(PROMPT, seed=7, **SAMPLE) == first
    assert "".join(stream(lm.model, lm.tokenizer, PROMPT, lm.sampling(seed=7, **SAMPLE))) == first
    long = lm.generate(PROMPT, seed=1, **{**SAMPLE, "max_new_tokens": 100})
    assert engine.cache.max_length >= len(lm.tokenizer.encode(PROMPT)) + 100
    assert long == "".join(stream(lm.model, lm.tokenizer, PROMPT, lm.sampling(seed=1, **{**SAMPLE,
                                                                                           "max_new_tokens": 100})))
    assert "".join(lm.stream(PROMPT, seed=7, **SAMPLE)) == first
    hi = [{"role": "user", "content": "hi"}]
    assert lm.chat(hi, seed=2, max_new_tokens=4) == "".join(stream(
        lm.model, lm.tokenizer, lm.tokenizer.apply_chat_template(hi), lm.sampling(seed=2, max_new_tokens=4,
                                                                                   stop=[IM_END])))
    prompts = [PROMPT, "the cat"]
    assert lm.generate(prompts, seed=[7, 3], **SAMPLE) == [first, lm.generate("the cat", seed=3, **SAMPLE)]
    assert lm.generate(prompts, seed=5, **SAMPLE) == generate_batch(lm.model, lm.tokenizer, prompts,
                                                                     lm.sampling(seed=5, **SAMPLE))
    assert lm.engine is engine and not engine.has_work


def test_interleaved_streams_of_one_lm_each_get_their_own_text(lm: LM) -> None:
    """Two streams of one LM, read in turns, share its engine's steps yet each yields what it yields alone."""
    alone = [list(lm.stream(p, seed=s, **SAMPLE)) for p, s in ((PROMPT, 1), ("the cat", 2))]
    streams = [lm.stream(PROMPT, seed=1, **SAMPLE), lm.stream("the cat", seed=2, **SAMPLE)]
    got: list[list[str]] = [[], []]
    live = [0, 1]
    while live:
        for i in list(live):
            piece = next(streams[i], None)
            if piece is None:
                live.remove(i)
            else:
                got[i].append(piece)
    assert ["".join(g) for g in got] == ["".join(p) for p in alone]


def test_a_request_beyond_the_lms_max_model_len_is_a_config_error(ckpt: Path) -> None:
    lm = lmforge.load(ckpt, device="cpu")
    lm.max_model_len = 16
    assert lm.generate("the cat", max_new_tokens=8, temperature=0) == greedy_text(
        lm.model, lm.tokenizer, lm.tokenizer.encode("the cat"), 8, {lm.tokenizer.eos_id})
    with pytest.raises(ConfigError, match="max_model_len=16"):
        lm.generate("the cat sat on the mat and the dog", max_new_tokens=12)
    assert lm.engine.max_model_len == 16
