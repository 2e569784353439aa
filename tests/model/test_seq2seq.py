"""The encoder-decoder: masks, caches, every knob, presets, and save/load through the one checkpoint module."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.checkpoint import kind_of, load_model, read_config, resolve_model_config, save_checkpoint
from lmforge.errors import ConfigError
from lmforge.model.seq2seq import Seq2Seq, Seq2SeqConfig, relative_bucket, seq2seq_preset, sinusoid

VARIANTS = {
    "pre-ln": {},
    "post-ln marian-like": dict(norm_position="post", activation="swish", final_logits_bias=True),
    "learned": dict(position="learned", activation="relu"),
    "t5-like": dict(position="relative", norm="rmsnorm", bias=False, activation="gated-gelu", scale_attention=False,
                    scale_embeddings=False, tie_embeddings=False),
    "t5-tied": dict(position="relative", norm="rmsnorm", bias=False, activation="relu", scale_attention=False,
                    scale_embeddings=False, rescale_output=True),
}


def random_seq2seq(vocab: int = 50, seed: int = 0, **overrides) -> Seq2Seq:
    torch.manual_seed(seed)
    model = Seq2Seq(seq2seq_preset("seq2seq-tiny", vocab_size=vocab, dropout=0.0, **overrides))
    with torch.no_grad():  # bigger weights than the init so logits differ by token
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3)
    return model.eval()


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(3, 50, (3, 9), generator=g)
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[1, 6:] = False
    mask[2, 2:] = False
    tgt = torch.randint(3, 50, (3, 6), generator=g)
    return src, mask, tgt


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_decoding_equals_teacher_forcing(variant: str) -> None:
    model = random_seq2seq(**VARIANTS[variant])
    src, mask, tgt = batch()
    full = model(src, mask, tgt)
    memory = model.encode(src, mask)
    cache = model.new_cache(3, 16)
    steps = [model.decode(tgt[:, :2], memory, mask, cache)]
    steps += [model.decode(tgt[:, i:i + 1], None, mask, cache) for i in range(2, tgt.shape[1])]
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS)
def test_padding_changes_nothing(variant: str) -> None:
    """A padded source gives the logits of the same source unpadded: the encoder and cross-attention mask pads."""
    model = random_seq2seq(**VARIANTS[variant])
    src, mask, tgt = batch()
    full = model(src, mask, tgt)
    for row, length in ((1, 6), (2, 2)):
        alone = model(src[row:row + 1, :length], None, tgt[row:row + 1])
        assert torch.allclose(alone, full[row:row + 1], atol=1e-4)


def test_decoder_is_causal_and_encoder_is_not() -> None:
    model = random_seq2seq()
    src, mask, tgt = batch()
    base = model(src, mask, tgt)
    changed_tgt = tgt.clone()
    changed_tgt[:, 4] = 7
    after = model(src, mask, changed_tgt)
    assert torch.allclose(after[:, :4], base[:, :4], atol=1e-6)  # earlier positions never see later tokens
    assert not torch.allclose(after[:, 4:], base[:, 4:])
    changed_src = src.clone()
    changed_src[0, 5] = 3 if src[0, 5] != 3 else 4
    assert not torch.allclose(model.encode(changed_src, mask)[0, 0], model.encode(src, mask)[0, 0])


def test_sinusoid_matches_the_paper() -> None:
    table = sinusoid(torch.arange(4), 8)
    pos, i = 3, 1
    assert table[pos, i] == pytest.approx(torch.sin(torch.tensor(pos / 10000 ** (2 * i / 8))).item(), abs=1e-6)
    assert table[pos, 4 + i] == pytest.approx(torch.cos(torch.tensor(pos / 10000 ** (2 * i / 8))).item(), abs=1e-6)


def test_relative_buckets() -> None:
    rel = torch.tensor([-200, -20, -3, 0, 3, 20, 200])
    both = relative_bucket(rel, True, 32, 128).tolist()
    assert both[3] == 0 and both[2] == 3 and both[4] == 16 + 3  # exact near zero, right side offset by half
    assert both[0] == 15 and both[-1] == 31  # beyond max_distance: the last bucket of each side
    left = relative_bucket(rel, False, 32, 128).tolist()
    assert left[4:] == [0, 0, 0] and left[2] == 3 and left[0] == 31  # the decoder only looks back


def test_presets_and_sizes() -> None:
    small = Seq2Seq(seq2seq_preset("seq2seq-small", vocab_size=16000))
    assert 10e6 <= small.num_params() <= 20e6
    assert small.lm_head.weight is small.embed.weight  # one matrix for source, target and output
    assert resolve_model_config("seq2seq-tiny", vocab_size=99).vocab_size == 99
    with pytest.raises(ConfigError, match="norm_position"):
        Seq2SeqConfig(norm_position="middle")
    with pytest.raises(ConfigError, match="eos_id"):
        Seq2SeqConfig(vocab_size=10, eos_id=10)


def test_save_and_load_through_checkpoint(tmp_path, tiny_tokenizer_dir) -> None:
    model = random_seq2seq(vocab=300, **VARIANTS["post-ln marian-like"])
    save_checkpoint(tmp_path, model, model.config, tokenizer_dir=tiny_tokenizer_dir)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architecture"] == "seq2seq" and config["norm_position"] == "post"
    assert kind_of(tmp_path) == "seq2seq"
    assert read_config(tmp_path) == model.config
    loaded = load_model(tmp_path)
    assert loaded.kind == "seq2seq" and isinstance(loaded.model, Seq2Seq)
    assert loaded.generation_config["num_beams"] >= 1  # seq2seq defaults: search, not sampling
    src, mask, tgt = batch()
    assert torch.equal(loaded.model(src, mask, tgt), model(src, mask, tgt))
