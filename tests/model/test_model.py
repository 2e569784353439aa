"""The decoder: initialisation statistics, parity with transformers' GPT-2 / Llama / Qwen3, KV cache, counts, config."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import pytest
import torch
import transformers
from torch import nn

from lmforge.config import PRESETS, ModelConfig, preset
from lmforge.errors import ConfigError
from lmforge.model.gpt import GPT

# --- initialisation --------------------------------------------------------------------------------

LAYERS = 2
INIT_SHAPES = {
    "gpt2": dict(norm="layernorm", mlp="gelu_tanh", position="learned", bias=True),
    "llama": dict(norm="rmsnorm", mlp="swiglu", position="rope", bias=False),
}


@functools.cache  # built once per (scheme, family); the tests only read it
def init_model(init: str, family: str) -> GPT:
    """Big enough that every matrix has ≥ 65k entries, so a measured std is within ~0.3% of the true one."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=1000, hidden_size=256, intermediate_size=1024, num_hidden_layers=LAYERS,
                         num_attention_heads=4, max_position_embeddings=128, tie_word_embeddings=False,
                         init=init, **INIT_SHAPES[family])
    return GPT(config)


def expected_std(init: str, name: str, weight: torch.Tensor) -> float:
    fan_out, fan_in = weight.shape
    if init == "xavier":  # Glorot & Bengio 2010: Var = 2 / (fan_in + fan_out)
        return math.sqrt(2 / (fan_in + fan_out))
    if init == "he":  # He et al. 2015: Var = 2 / fan_in
        return math.sqrt(2 / fan_in)
    if name.endswith(("attn.proj.weight", "mlp.down.weight")):  # GPT-2's residual scaling
        return 0.02 / math.sqrt(2 * LAYERS)
    return 0.02


@pytest.mark.parametrize("family", INIT_SHAPES)
@pytest.mark.parametrize("init", ["normal", "xavier", "he"])
def test_linear_weights_have_the_std_of_their_init_scheme(init: str, family: str) -> None:
    """Every Linear weight's measured std is within 3% of the scheme's theory (incl. GPT-2's residual scaling)."""
    model = init_model(init, family)
    linears = {f"{n}.weight": m.weight for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert len(linears) == 4 * LAYERS + 1
    for name, weight in linears.items():
        std = expected_std(init, name, weight)
        measured = weight.detach().std().item()
        assert measured == pytest.approx(std, rel=0.03), name
        assert abs(weight.detach().mean().item()) < 0.05 * std, name


@pytest.mark.parametrize("family", INIT_SHAPES)
@pytest.mark.parametrize("init", ["normal", "xavier", "he"])
def test_embeddings_are_normal_with_initializer_range_in_every_scheme(init: str, family: str) -> None:
    """Token (and learned position) embeddings are N(0, 0.02) whatever the Linear scheme."""
    model = init_model(init, family)
    embeddings = [model.embed.weight] + ([model.pos_embed.weight] if model.pos_embed is not None else [])
    for weight in embeddings:
        assert weight.detach().std().item() == pytest.approx(0.02, rel=0.03)
        assert abs(weight.detach().mean().item()) < 0.001


@pytest.mark.parametrize("family", INIT_SHAPES)
@pytest.mark.parametrize("init", ["normal", "xavier", "he"])
def test_biases_start_at_zero_and_norm_scales_at_one(init: str, family: str) -> None:
    """Every bias (Linear and norm) is exactly 0 and every norm scale exactly 1."""
    model = init_model(init, family)
    norms = [m for m in model.modules() if isinstance(m, (nn.LayerNorm, nn.RMSNorm))]
    assert len(norms) == 2 * LAYERS + 1
    for norm in norms:
        assert torch.equal(norm.weight, torch.ones_like(norm.weight))
    biases = [p for n, p in model.named_parameters() if n.endswith(".bias")]
    assert len(biases) == (4 * LAYERS + 2 * LAYERS + 1 if family == "gpt2" else 0)  # Linears, then norms
    for bias in biases:
        assert torch.equal(bias, torch.zeros_like(bias))


# --- parity with transformers ----------------------------------------------------------------------

VOCAB, CONTEXT = 100, 64


def randomize(model: nn.Module, seed: int = 0) -> None:
    """Random values in every parameter (norm scales around 1, biases nonzero) so a wrong mapping shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name or "ln_" in name:
                p.copy_(1.0 + 0.1 * noise if name.endswith("weight") else 0.1 * noise)
            else:
                p.copy_(0.1 * noise)


def load_exact(ours: GPT, state: dict[str, torch.Tensor]) -> None:
    """Copy `state` into our model, requiring that it names every parameter we have and nothing else."""
    expected = set(dict(ours.named_parameters()))
    assert set(state) == expected, (sorted(expected - set(state)), sorted(set(state) - expected))
    with torch.no_grad():
        for name, p in ours.named_parameters():
            assert state[name].shape == p.shape, name
            p.copy_(state[name])


def tokens(batch: int = 2, length: int = 23, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def assert_same_logits(ours: GPT, theirs: nn.Module) -> None:
    ours.eval()
    theirs.eval()
    idx = tokens()
    with torch.no_grad():
        expected = theirs(idx).logits
        got = ours(idx)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-4


def test_gpt2_logits_match_transformers() -> None:
    """Our gpt2-tiny with GPT2LMHeadModel's weights (Conv1D transposed) gives its logits to 1e-4 in fp32."""
    torch.manual_seed(0)
    theirs = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=CONTEXT, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, layer_norm_epsilon=1e-5))
    randomize(theirs)
    ours = GPT(preset("gpt2-tiny", vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      max_position_embeddings=CONTEXT))
    hf = theirs.state_dict()
    state = {"embed.weight": hf["transformer.wte.weight"], "pos_embed.weight": hf["transformer.wpe.weight"],
             "norm.weight": hf["transformer.ln_f.weight"], "norm.bias": hf["transformer.ln_f.bias"]}
    names = {"ln_1": "attn_norm", "ln_2": "mlp_norm", "attn.c_attn": "attn.qkv", "attn.c_proj": "attn.proj",
             "mlp.c_fc": "mlp.up", "mlp.c_proj": "mlp.down"}
    for i in range(2):
        for theirs_name, our_name in names.items():
            weight = hf[f"transformer.h.{i}.{theirs_name}.weight"]
            state[f"blocks.{i}.{our_name}.weight"] = weight if theirs_name.startswith("ln") else weight.T  # Conv1D
            state[f"blocks.{i}.{our_name}.bias"] = hf[f"transformer.h.{i}.{theirs_name}.bias"]
    load_exact(ours, state)
    assert ours.lm_head.weight is ours.embed.weight  # tied, as GPT-2's head is to wte
    assert_same_logits(ours, theirs)


def llama_style_state(hf: dict[str, torch.Tensor], layers: int, qk_norm: bool) -> dict[str, torch.Tensor]:
    state = {"embed.weight": hf["model.embed_tokens.weight"], "norm.weight": hf["model.norm.weight"],
             "lm_head.weight": hf["lm_head.weight"]}
    for i in range(layers):
        p, q = f"model.layers.{i}.", f"blocks.{i}."
        state[q + "attn.qkv.weight"] = torch.cat([hf[p + f"self_attn.{x}_proj.weight"] for x in "qkv"])
        state[q + "attn.proj.weight"] = hf[p + "self_attn.o_proj.weight"]
        state[q + "mlp.up.weight"] = torch.cat([hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"]])
        state[q + "mlp.down.weight"] = hf[p + "mlp.down_proj.weight"]
        state[q + "attn_norm.weight"] = hf[p + "input_layernorm.weight"]
        state[q + "mlp_norm.weight"] = hf[p + "post_attention_layernorm.weight"]
        if qk_norm:
            state[q + "attn.q_norm.weight"] = hf[p + "self_attn.q_norm.weight"]
            state[q + "attn.k_norm.weight"] = hf[p + "self_attn.k_norm.weight"]
    return state


LLAMA_SIZES = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=128, max_position_embeddings=CONTEXT, tie_word_embeddings=False,
                   vocab_size=VOCAB)


def test_llama_logits_match_transformers() -> None:
    """Our llama-tiny (RoPE, RMSNorm, SwiGLU, GQA) with LlamaForCausalLM's weights gives its logits to 1e-4."""
    torch.manual_seed(0)
    theirs = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **LLAMA_SIZES, rms_norm_eps=1e-5, rope_theta=10000.0, attention_bias=False, mlp_bias=False))
    randomize(theirs)
    ours = GPT(preset("llama-tiny", **LLAMA_SIZES, rope_theta=10000.0, norm_eps=1e-5))
    load_exact(ours, llama_style_state(theirs.state_dict(), 2, qk_norm=False))
    assert_same_logits(ours, theirs)


@pytest.mark.skipif(not hasattr(transformers, "Qwen3ForCausalLM"),
                    reason=f"transformers {transformers.__version__} has no Qwen3ForCausalLM")
def test_qwen3_logits_match_transformers() -> None:
    """Our qwen3-tiny (per-head RMSNorm on q and k before RoPE) with Qwen3ForCausalLM's weights gives its logits."""
    torch.manual_seed(0)
    theirs = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        **LLAMA_SIZES, head_dim=16, rms_norm_eps=1e-5, rope_theta=1e6, attention_bias=False,
        use_sliding_window=False))
    randomize(theirs)
    ours = GPT(preset("qwen3-tiny", **LLAMA_SIZES, rope_theta=1e6, norm_eps=1e-5))
    load_exact(ours, llama_style_state(theirs.state_dict(), 2, qk_norm=True))
    assert_same_logits(ours, theirs)


# --- KV cache ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny", "qwen3-tiny"])
def test_chunked_forward_through_the_cache_equals_the_full_forward(name: str) -> None:
    """Prefill 7 tokens, then 1, then 5 through a KV cache: the logits equal one uncached pass over all 13.

    In float64, so the 1e-5 bound measures the cache's logic and not fp32 kernel-order round-off
    (which reaches ~2e-5 on llama-tiny's 6 layers with these weights).
    """
    torch.manual_seed(0)
    model = GPT(preset(name, vocab_size=VOCAB)).eval()
    randomize(model)
    model.double()
    idx = tokens(batch=2, length=13)
    with torch.no_grad():
        full = model(idx)
        cache = model.new_cache(batch_size=2, max_length=13)
        chunks = [model(idx[:, a:b], cache=cache) for a, b in ((0, 7), (7, 8), (8, 13))]
    assert cache.length == 13
    assert full.abs().max() > 1.0  # logits far from uniform, so a wrong position or mask would show
    assert (torch.cat(chunks, dim=1) - full).abs().max().item() <= 1e-5


# --- counts -----------------------------------------------------------------------------------------


def test_num_params_counts_a_tied_head_once() -> None:
    """gpt2-tiny's parameter count, by hand from its shapes, includes the tied embedding/head matrix once."""
    V, H, L, P = 300, 128, 2, 256
    model = GPT(preset("gpt2-tiny", vocab_size=V))
    per_layer = (2 * 2 * H  # two LayerNorms, weight + bias
                 + H * 3 * H + 3 * H  # qkv
                 + H * H + H  # attention output
                 + H * 4 * H + 4 * H  # MLP up
                 + 4 * H * H + H)  # MLP down
    assert model.num_params() == V * H + P * H + L * per_layer + 2 * H
    untied = GPT(preset("gpt2-tiny", vocab_size=V, tie_word_embeddings=False))
    assert untied.num_params() == model.num_params() + V * H


def test_flops_per_token_is_6n_plus_attention_term() -> None:
    """llama-tiny (tied head, GQA): 6N + 12·L·heads·head_dim·T, with N the non-embedding weights plus the head."""
    V, T = 1000, 128
    c = preset("llama-tiny", vocab_size=V)
    H, L, nh, nkv, hd, inter = (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
                                c.head_dim, c.intermediate_size)
    per_layer = 2 * H + H * (nh + 2 * nkv) * hd + nh * hd * H + H * 2 * inter + inter * H
    n = L * per_layer + H + V * H  # blocks, final norm, head (tied to the embedding, still a matmul)
    model = GPT(c)
    assert model.flops_per_token(T) == 6 * n + 12 * L * nh * hd * T
    assert model.flops_per_token(T, training=False) == (6 * n + 12 * L * nh * hd * T) / 3


# --- configuration ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("fields", "message"), [
    (dict(hidden_size=100, num_attention_heads=3), r"hidden_size=100 .*num_attention_heads=3"),
    (dict(num_attention_heads=4, num_key_value_heads=3), r"num_attention_heads=4 .*num_key_value_heads=3"),
    (dict(norm="batchnorm"), r"norm='batchnorm'"),
    (dict(position="alibi"), r"position='alibi'"),
])
def test_inconsistent_model_config_names_the_field(fields: dict, message: str) -> None:
    """Shapes that cannot form a model, or a choice not offered, raise ConfigError naming the field and value."""
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**fields)


@pytest.mark.parametrize("field", ["num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size"])
@pytest.mark.parametrize("value", [0, -4])
def test_non_positive_sizes_are_a_config_error_naming_the_field(field: str, value: int) -> None:
    """A head count or size of 0 or below raises ConfigError naming it, not ZeroDivisionError or a later crash."""
    with pytest.raises(ConfigError, match=field):
        ModelConfig(**{field: value})


def test_unknown_preset_lists_the_presets() -> None:
    """preset('nope') raises ConfigError naming it and every built-in preset."""
    with pytest.raises(ConfigError, match="'nope'") as info:
        preset("nope")
    for name in PRESETS:
        assert name in str(info.value)


def test_config_json_with_an_unknown_key_names_the_key(tmp_path: Path) -> None:
    """A config.json carrying a key ModelConfig lacks is refused, naming the key and the file."""
    data = preset("gpt2-tiny").to_dict() | {"n_inner": 512}
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"config\.json.*n_inner"):
        ModelConfig.load(tmp_path / "config.json")


def test_hf_config_json_points_to_lmforge_convert(tmp_path: Path) -> None:
    """A transformers GPT-2 config.json (model_type gpt2) is refused with a pointer to `lmforge convert`."""
    transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4).to_json_file(tmp_path / "config.json")
    with pytest.raises(ConfigError, match=r"'gpt2'.*lmforge convert"):
        ModelConfig.load(tmp_path / "config.json")


@pytest.mark.parametrize("name", PRESETS)
def test_config_round_trips_through_dict_and_json(name: str) -> None:
    """from_dict(to_dict(c)) == c for every preset, also after a JSON round trip (as config.json stores it)."""
    config = preset(name)
    assert ModelConfig.from_dict(config.to_dict()) == config
    assert ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
