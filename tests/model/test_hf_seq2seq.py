"""Marian and T5 import with transformers' logits, decode to transformers' `generate` tokens, and export back."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from lmforge.checkpoint import kind_of, load_model, save_checkpoint
from lmforge.convert import from_hf, to_hf
from lmforge.errors import ConfigError
from lmforge.infer.sampling import SamplingParams
from lmforge.infer.seq2seq import Seq2SeqSearch, decode_sources
from lmforge.lm import load
from lmforge.model.hf_seq2seq import hf_family, load_hf_model
from lmforge.model.seq2seq import Seq2Seq, seq2seq_preset

transformers = pytest.importorskip("transformers")
warnings.filterwarnings("ignore", category=UserWarning)

V = 64
SEARCHES = [dict(num_beams=1), dict(num_beams=4), dict(num_beams=4, length_penalty=0.6, early_stopping=True),
            dict(num_beams=3, length_penalty=2.0, early_stopping="never", num_return_sequences=3)]


def marian(**overrides):
    config = dict(vocab_size=V, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                  decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64,
                  activation_function="swish", scale_embedding=True, pad_token_id=V - 1,
                  decoder_start_token_id=V - 1, eos_token_id=0)
    return transformers.MarianMTModel(transformers.MarianConfig(**{**config, **overrides}))


def t5(**overrides):
    config = dict(vocab_size=V, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2, decoder_start_token_id=0,
                  relative_attention_num_buckets=8, relative_attention_max_distance=20)
    return transformers.T5ForConditionalGeneration(transformers.T5Config(**{**config, **overrides}))


MODELS = {"marian": marian, "t5": t5, "t5-v1.1": lambda: t5(feed_forward_proj="gated-gelu", tie_word_embeddings=False)}


def saved(kind: str, directory: Path):
    """A random tiny transformers model (weights N(0, 0.5) so outputs vary), saved and loaded back."""
    torch.manual_seed(0)
    model = MODELS[kind]().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
        if kind == "marian":
            model.final_logits_bias.normal_(0.0, 1.0)
    model.save_pretrained(directory)
    return type(model).from_pretrained(directory).eval()


@pytest.fixture(scope="module", params=list(MODELS))
def pair(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    theirs = saved(request.param, directory)
    return request.param, theirs, directory


def test_logits_match_transformers(pair) -> None:
    kind, theirs, directory = pair
    ours, config = load_hf_model(directory)
    assert config.family == kind.split("-")[0]
    g = torch.Generator().manual_seed(1)
    src = torch.randint(2, V - 2, (2, 30), generator=g)  # longer than T5's max_distance: the far buckets too
    mask = torch.ones_like(src)
    mask[1, 18:] = 0
    tgt = torch.randint(2, V - 2, (2, 25), generator=g)
    with torch.no_grad():
        reference = theirs(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits
        logits = ours(src, mask.bool(), tgt)
    assert reference.abs().max() > 0.5  # a real comparison, not of near-zero outputs
    assert (logits - reference).abs().max() < 1e-4


def test_t5_decoder_deeper_than_encoder(tmp_path) -> None:
    torch.manual_seed(0)
    model = t5(num_decoder_layers=3, feed_forward_proj="gated-gelu").eval()
    model.save_pretrained(tmp_path)
    ours, config = load_hf_model(tmp_path)
    assert (config.n_encoder_layers, config.n_decoder_layers) == (2, 3)
    src, tgt = torch.randint(2, V, (1, 9)), torch.randint(2, V, (1, 7))
    with torch.no_grad():
        reference = model(input_ids=src, decoder_input_ids=tgt).logits
        assert (ours(src, None, tgt) - reference).abs().max() < 1e-4


def until_eos(ids: list[int], eos: int) -> list[int]:
    """generate's row without the start token, cut before eos (after it come pads to the batch's length)."""
    return ids[:ids.index(eos)] if eos in ids else ids


@pytest.mark.parametrize("options", SEARCHES, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_decoding_equals_generate(pair, options) -> None:
    """Greedy and beam search (length penalty, early stopping, n-best) give generate's tokens, for each source
    alone and for all of them in one padded batch."""
    _, theirs, directory = pair
    ours, config = load_hf_model(directory)
    options = dict(options)
    early, n = options.pop("early_stopping", False), options.pop("num_return_sequences", 1)
    g = torch.Generator().manual_seed(2)
    sources = [[*torch.randint(2, V - 2, (length,), generator=g).tolist(), config.eos_id] for length in (7, 12, 3, 9)]
    forced = theirs.generation_config.forced_eos_token_id
    search = Seq2SeqSearch(early_stopping=early, num_return_sequences=n, forced_eos_id=forced)
    params = SamplingParams(max_new_tokens=12, temperature=0.0, **options)
    batched = decode_sources(ours, sources, params, search, {config.eos_id}, batch_size=4)
    lengths = set()
    for source, got in zip(sources, batched):
        with torch.no_grad():
            out = theirs.generate(input_ids=torch.tensor([source]), max_new_tokens=12, do_sample=False,
                                  early_stopping=early, num_return_sequences=n, **options)
        expected = [until_eos(row.tolist()[1:], config.eos_id) for row in out]
        assert got == expected
        assert decode_sources(ours, [source], params, search, {config.eos_id})[0] == expected
        lengths |= {len(e) for e in expected}
    assert len(lengths) > 1 or max(lengths) > 0  # outputs vary: the comparison is not of empty strings


def test_load_model_translate_and_convert(tmp_path, tiny_tokenizer_dir) -> None:
    """An HF folder loads through the one loader (LM.translate works), and `convert from-hf` writes our checkpoint
    with the same logits."""
    from lmforge.tokenizer import Tokenizer

    folder = tmp_path / "hf"
    torch.manual_seed(0)
    big = marian(vocab_size=Tokenizer.load(tiny_tokenizer_dir).vocab_size, pad_token_id=0,
                 decoder_start_token_id=0, eos_token_id=Tokenizer.load(tiny_tokenizer_dir).eos_id).eval()
    big.save_pretrained(folder)
    Tokenizer.load(tiny_tokenizer_dir).save(folder)
    assert kind_of(folder) == "seq2seq"
    loaded = load_model(folder)
    assert isinstance(loaded.model, Seq2Seq) and loaded.generation_config["temperature"] == 0.0
    lm = load(folder, device="cpu")
    out = lm.translate(["the cat sat", "a dog"], num_beams=2, max_new_tokens=5)
    assert isinstance(out, list) and len(out) == 2 and all(isinstance(o, str) for o in out)
    ours = from_hf(folder, tmp_path / "ours")
    assert kind_of(ours) == "seq2seq"
    src, tgt = torch.randint(3, 50, (1, 6)), torch.randint(3, 50, (1, 4))
    with torch.no_grad():
        assert torch.allclose(load_model(ours).model(src, None, tgt), big(input_ids=src, decoder_input_ids=tgt).logits,
                              atol=1e-4)


@pytest.mark.parametrize("shape", ["marian", "t5", "t5-untied-scale"])
def test_export_round_trip(shape, tmp_path, tiny_tokenizer_dir) -> None:
    """Our post-LN sinusoidal config exports as Marian, our relative one as T5; transformers computes our logits."""
    overrides = {
        "marian": dict(norm_position="post", activation="swish", final_logits_bias=False),
        "t5": dict(norm_position="pre", position="relative", norm="rmsnorm", bias=False, activation="gated-gelu",
                   scale_embeddings=False, scale_attention=False, rescale_output=True),
        "t5-untied-scale": dict(norm_position="pre", position="relative", norm="rmsnorm", bias=False,
                                activation="relu", scale_embeddings=False, scale_attention=False),
    }[shape]
    from lmforge.tokenizer import Tokenizer

    vocab = Tokenizer.load(tiny_tokenizer_dir).vocab_size
    torch.manual_seed(0)
    model = Seq2Seq(seq2seq_preset("seq2seq-tiny", vocab_size=vocab, dropout=0.0, **overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    save_checkpoint(tmp_path / "ours", model, model.config, tokenizer_dir=tiny_tokenizer_dir)
    out = to_hf(tmp_path / "ours", tmp_path / "hf")
    theirs = transformers.AutoModelForSeq2SeqLM.from_pretrained(out).eval()
    src, tgt = torch.randint(3, vocab, (2, 11)), torch.randint(3, vocab, (2, 7))
    mask = torch.ones_like(src)
    mask[0, 8:] = 0
    with torch.no_grad():
        expected = model(src, mask.bool(), tgt)
        assert (theirs(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits - expected).abs().max() < 1e-4
        back, _ = load_hf_model(out)  # and back in
        assert (back(src, mask.bool(), tgt) - expected).abs().max() < 1e-4


def test_default_preset_names_why_it_cannot_export() -> None:
    with pytest.raises(ConfigError, match="Marian needs norm_position=post"):
        hf_family(seq2seq_preset("seq2seq-tiny"))
