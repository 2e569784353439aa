"""The inference engine: batched and continuous decoding equal one-at-a-time decoding, penalties follow their
formulas, logprobs equal a direct forward, cancellation frees a row, beam search matches transformers."""

from __future__ import annotations

import math

import conftest
import pytest
import torch
import torch.nn.functional as F
from test_generate import ScriptedModel, greedy_without_cache

from lmforge.errors import ConfigError
from lmforge.infer.engine import Engine, Output, Request
from lmforge.infer.sampling import SamplingParams, min_p_filter, penalize
from lmforge.model.gpt import GPT
from lmforge.tokenizer import IM_END

VOCAB = 300
PROMPTS = [[5, 17, 42, 99, 3, 250, 7], [11, 12], [200, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 44], [77]]


def model64(name: str = "llama-tiny", **overrides) -> GPT:
    """float64: batched and single-row matmuls then agree far below any argmax near-tie."""
    return conftest.random_gpt(name, VOCAB, **overrides).double()


def run_all(engine: Engine, requests: list[Request], join_after: dict[int, int] | None = None) -> dict[str, list]:
    """Step until done; request i is added after join_after[i] steps (0 = at once). Returns outputs by id."""
    join_after = join_after or {}
    outputs: dict[str, list[Output]] = {r.id: [] for r in requests}
    step = 0
    pending = list(requests)
    while pending or engine.has_work:
        for r in [r for r in pending if join_after.get(int(r.id), 0) <= step]:
            engine.add(r)
            pending.remove(r)
        for out in engine.step():
            outputs[out.request.id].append(out)
        step += 1
    return outputs


def tokens_of(outputs: list[Output]) -> list[int]:
    return [t for out in outputs for t in out.token_ids]


def alone(model: GPT, prompt: list[int], params: SamplingParams) -> list[int]:
    engine = Engine(model, max_batch=params.num_beams)
    return tokens_of(run_all(engine, [Request(prompt, params, id="0")])["0"])


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny", "qwen3-tiny"])
def test_batched_greedy_equals_uncached_argmax(name):
    """Four prompts of different lengths decoded together each equal step-by-step argmax without a cache."""
    model = model64(name)
    params = SamplingParams(max_new_tokens=12, temperature=0, stop_at_eos=False)
    requests = [Request(p, params, id=str(i)) for i, p in enumerate(PROMPTS)]
    outputs = run_all(Engine(model, max_batch=4), requests)
    for i, prompt in enumerate(PROMPTS):
        assert tokens_of(outputs[str(i)]) == greedy_without_cache(model, prompt, 12)


def test_requests_joining_and_leaving_mid_batch_equal_each_alone():
    """Continuous batching: requests with different budgets join at different steps, some wait for a free
    row (max_batch 2), rows are reused, and every request still decodes exactly as it would alone."""
    model = model64("gpt2-tiny")
    budgets = [3, 9, 5, 7]
    requests = [Request(p, SamplingParams(max_new_tokens=b, temperature=0, stop_at_eos=False), id=str(i))
                for i, (p, b) in enumerate(zip(PROMPTS, budgets))]
    outputs = run_all(Engine(model, max_batch=2), requests, join_after={0: 0, 1: 1, 2: 2, 3: 2})
    for i, r in enumerate(requests):
        assert tokens_of(outputs[str(i)]) == alone(model, r.prompt_ids, r.params)
        assert len(tokens_of(outputs[str(i)])) == budgets[i]
        assert outputs[str(i)][-1].finish_reason == "length"


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch():
    """A seeded request samples the same tokens alone and beside other sampling requests; seeds differ."""
    model = model64("qwen3-tiny", std=None)
    params = [SamplingParams(max_new_tokens=16, seed=s, top_k=50, top_p=0.9, stop_at_eos=False) for s in (0, 1, 0)]
    requests = [Request(PROMPTS[0], p, id=str(i)) for i, p in enumerate(params)]
    outputs = run_all(Engine(model, max_batch=3), requests)
    first = tokens_of(outputs["0"])
    assert first == alone(model, PROMPTS[0], params[0]) == tokens_of(outputs["2"])
    assert first != tokens_of(outputs["1"])


def test_penalties_follow_ctrl_and_openai_formulas():
    """CTRL divides positive / multiplies negative logits of seen tokens; OpenAI subtracts
    frequency·count + presence·[count > 0] over generated tokens."""
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0, 1.0]])
    seen = torch.tensor([[True, True, False, False, True]])
    counts = torch.tensor([[0, 2, 0, 1, 3]])
    params = [SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)]
    expected = []
    for j, x in enumerate(logits[0].tolist()):
        if seen[0, j]:
            x = x / 2.0 if x > 0 else x * 2.0
        c = counts[0, j].item()
        expected.append(x - c * 0.5 - (c > 0) * 0.25)
    assert penalize(logits, params, seen, counts)[0].tolist() == pytest.approx(expected)


def test_presence_penalty_stops_greedy_repeats():
    """With a large presence penalty no generated token repeats; without it the random model loops."""
    model = model64("gpt2-tiny")
    plain = alone(model, PROMPTS[1], SamplingParams(max_new_tokens=40, temperature=0, stop_at_eos=False))
    penalized = alone(model, PROMPTS[1], SamplingParams(max_new_tokens=40, temperature=0, stop_at_eos=False,
                                                        presence_penalty=1e4))
    assert len(set(plain)) < len(plain)
    assert len(set(penalized)) == len(penalized)


def test_min_p_keeps_tokens_at_least_min_p_times_the_top_probability():
    probs = torch.tensor([[0.5, 0.3, 0.12, 0.05, 0.03]])
    kept = min_p_filter(probs.log(), 0.2).isfinite()[0].tolist()
    assert kept == [True, True, True, False, False]


def test_logprobs_equal_log_softmax_of_an_uncached_forward():
    """Each chosen token's logprob and its top alternatives equal log_softmax over a full forward."""
    model = model64("llama-tiny")
    prompt = PROMPTS[0]
    params = SamplingParams(max_new_tokens=6, temperature=0, stop_at_eos=False, logprobs=3)
    outputs = run_all(Engine(model), [Request(prompt, params, id="0")])["0"]
    logprobs = [lp for out in outputs for lp in out.logprobs or []]
    tokens = tokens_of(outputs)
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([prompt + tokens])), dim=-1)[0]
    for i, lp in enumerate(logprobs):
        row = logp[len(prompt) - 1 + i]
        assert lp.token_id == tokens[i]
        assert lp.logprob == pytest.approx(row[tokens[i]].item(), abs=1e-9)
        ids = row.topk(3).indices
        assert [t for t, _ in lp.top] == ids.tolist()
        assert lp.top[0][0] == tokens[i]  # greedy picks the most likely


def test_prompt_logprobs_score_every_prompt_token_without_generating():
    """echo-style scoring: max_new_tokens=0 returns log p(token_i | tokens before i) for i ≥ 1 and no tokens."""
    model = model64("gpt2-tiny")
    prompt = PROMPTS[2]
    request = Request(prompt, SamplingParams(max_new_tokens=0), id="0", prompt_logprobs=2)
    [out] = run_all(Engine(model), [request])["0"]
    assert out.token_ids == [] and out.finish_reason == "length"
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([prompt])), dim=-1)[0]
    assert out.prompt_logprobs[0] is None
    got = [lp.logprob for lp in out.prompt_logprobs[1:]]
    assert got == pytest.approx([logp[i - 1, prompt[i]].item() for i in range(1, len(prompt))], abs=1e-9)


def test_cancelled_request_ends_and_frees_its_row_for_others():
    model = model64("gpt2-tiny")
    params = SamplingParams(max_new_tokens=10, temperature=0, stop_at_eos=False)
    engine = Engine(model, max_batch=2)
    doomed, kept = Request(PROMPTS[0], params, id="0"), Request(PROMPTS[1], params, id="1")
    engine.add(doomed)
    engine.add(kept)
    outputs: dict[str, list[Output]] = {"0": [], "1": [], "2": []}
    for _ in range(2):
        for out in engine.step():
            outputs[out.request.id].append(out)
    engine.cancel("0")
    waiting = engine.add(Request(PROMPTS[3], params, id="2"))
    while engine.has_work:
        for out in engine.step():
            outputs[out.request.id].append(out)
    assert outputs["0"][-1].finish_reason == "cancelled"
    # what it produced in its two steps (the prefill's token, then one per step) and nothing after the cancel
    assert tokens_of(outputs["0"]) == alone(model, PROMPTS[0], params)[:3]
    assert tokens_of(outputs["1"]) == alone(model, PROMPTS[1], params)
    assert tokens_of(outputs["2"]) == alone(model, waiting.prompt_ids, params)


def test_special_stop_token_ends_generation_like_eos(tiny_tokenizer):
    """<|im_end|> as a stop string is caught by id, since the streamed text skips special tokens."""
    im_end = tiny_tokenizer.token_to_id(IM_END)
    script = [*tiny_tokenizer.encode("the cat"), im_end, *tiny_tokenizer.encode(" sat")]
    model = ScriptedModel(script, tiny_tokenizer.vocab_size, tiny_tokenizer.eos_id)
    request = Request([5], SamplingParams(stop=[IM_END]), id="0")
    outputs = run_all(Engine(model, tiny_tokenizer, max_batch=1), [request])["0"]
    assert "".join(o.text for o in outputs) == "the cat"
    assert outputs[-1].finish_reason == "stop"


def hf_gpt2_pair() -> tuple[torch.nn.Module, GPT]:
    """A random tiny transformers GPT-2 and our GPT with the same weights (Conv1D stores W transposed)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4, bos_token_id=0,
                        eos_token_id=0)
    hf = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3)
    ours = conftest.random_gpt("gpt2-tiny", VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                               max_position_embeddings=64)
    h = hf.transformer
    with torch.no_grad():
        ours.embed.weight.copy_(h.wte.weight)
        ours.pos_embed.weight.copy_(h.wpe.weight)
        for block, src in zip(ours.blocks, h.h):
            pairs = [(block.attn_norm, src.ln_1), (block.mlp_norm, src.ln_2)]
            pairs += [(block.attn.qkv, src.attn.c_attn), (block.attn.proj, src.attn.c_proj),
                      (block.mlp.up, src.mlp.c_fc), (block.mlp.down, src.mlp.c_proj)]
            for dst, s in pairs:
                dst.weight.copy_(s.weight.T if s.weight.dim() == 2 else s.weight)
                dst.bias.copy_(s.bias)
        ours.norm.weight.copy_(h.ln_f.weight)
        ours.norm.bias.copy_(h.ln_f.bias)
    return hf.double(), ours.double().eval()


@pytest.mark.parametrize("num_beams", [2, 4])
def test_beam_search_matches_transformers(num_beams):
    """Our beam search returns transformers' `generate(num_beams, length_penalty)` sequence, with an eos
    that ends some beams early so the length penalty decides between endings of different lengths."""
    hf, ours = hf_gpt2_pair()
    prompt = [5, 17, 42, 99]
    ids = torch.tensor([prompt])
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, ours(ids), atol=1e-9)
        greedy = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=6,
                             pad_token_id=0, eos_token_id=None)[0, len(prompt):].tolist()
    eos = greedy[2]  # an end token the search is sure to meet
    results = set()
    for length_penalty in (-1.0, 0.0, 1.0, 3.0):
        with torch.no_grad():
            expected = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, num_beams=num_beams,
                                   length_penalty=length_penalty, max_new_tokens=10, eos_token_id=eos,
                                   pad_token_id=eos)[0, len(prompt):].tolist()
        if expected and expected[-1] == eos:
            expected = expected[:-1]
        params = SamplingParams(num_beams=num_beams, length_penalty=length_penalty, max_new_tokens=10)
        got = tokens_of(run_all(Engine(ours, eos_id=eos), [Request(prompt, params, id="0")])["0"])
        assert got == expected, length_penalty
        results.add(tuple(got))
    assert len(results) > 1  # the penalty changed the winner somewhere


def test_temperature_sampling_follows_the_softmax():
    """Batched rows with their own temperature draw tokens at the rates softmax(logits / T) predicts."""
    from lmforge.infer.sampling import sample_batch

    logits = torch.tensor([[math.log(0.6), math.log(0.4)]]).expand(4000, -1)
    params = [SamplingParams(temperature=0.5)] * 4000
    draws = sample_batch(logits, params, [torch.Generator().manual_seed(i) for i in range(4000)])
    expected = 0.4**2 / (0.6**2 + 0.4**2)
    assert draws.float().mean().item() == pytest.approx(expected, abs=0.03)


def test_lm_generate_of_a_list_equals_each_prompt_alone(make_lm):
    """`lm.generate([...])` decodes the prompts as one batch; each completion equals its own generate."""
    lm = make_lm("gpt2-tiny")
    lm.model.double()
    prompts = ["the cat sat", "a model learns to predict the next word", "x"]
    batch = lm.generate(prompts, temperature=0, max_new_tokens=8, stop_at_eos=False)
    assert batch == [lm.generate(p, temperature=0, max_new_tokens=8, stop_at_eos=False) for p in prompts]
    assert len(set(batch)) == 3


def test_prepacked_bf16_view_decodes_like_the_model_and_follows_weight_updates():
    """On CPU, bf16 decoding goes through oneDNN-prepacked weights: same tokens as the plain model, and an
    in-place weight update (an optimizer step) rebuilds the view rather than decoding stale weights."""
    from lmforge.infer.fast import PackedLinear, decode_model

    model = conftest.random_gpt("llama-tiny", VOCAB).bfloat16()
    fast = decode_model(model)
    if fast is model:
        pytest.skip("no oneDNN bf16 on this CPU")
    assert isinstance(fast.blocks[0].attn.qkv, PackedLinear) and decode_model(model) is fast
    params = SamplingParams(max_new_tokens=12, temperature=0, stop_at_eos=False)

    def run(use_fast: bool) -> list[int]:
        return tokens_of(run_all(Engine(model, max_batch=1, fast=use_fast), [Request(PROMPTS[0], params, id="0")])["0"])

    assert run(True) == run(False)
    with torch.no_grad():
        model.lm_head.weight.mul_(-1.0)
    assert decode_model(model) is not fast
    assert run(True) == run(False)


def test_penalized_requests_keep_their_own_history_when_rows_move():
    """Penalty state (seen tokens, counts) belongs to the request: when a finished row's hole is filled
    by moving the last row, the moved request keeps penalizing its own history, as when alone."""
    model = model64("gpt2-tiny")
    settings = [{}, dict(frequency_penalty=1.5, presence_penalty=0.5), dict(repetition_penalty=1.8)]
    budgets = [4, 12, 9]
    requests = [Request(PROMPTS[i], SamplingParams(max_new_tokens=b, temperature=0, stop_at_eos=False, **s), id=str(i))
                for i, (s, b) in enumerate(zip(settings, budgets))]
    outputs = run_all(Engine(model, max_batch=3), requests)
    for i, r in enumerate(requests):
        assert tokens_of(outputs[str(i)]) == alone(model, r.prompt_ids, r.params)


def hf_mistral_pair(tmp_path, window: int) -> tuple[torch.nn.Module, GPT]:
    """A random tiny transformers Mistral with a short sliding window, and the same weights loaded as our GPT."""
    from transformers import MistralConfig, MistralForCausalLM

    from lmforge.model.hf import load_hf_model

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                           sliding_window=window)
    hf = MistralForCausalLM(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.3 if p.dim() >= 2 else 0.1).add_(1.0 if p.dim() == 1 else 0.0)
    hf.save_pretrained(tmp_path)
    ours, _ = load_hf_model(tmp_path)
    assert ours.config.sliding_window == window
    return hf.double(), ours.double().eval()


def test_sliding_window_holds_when_rows_of_different_lengths_decode_together(tmp_path):
    """Mistral-style attention to the last 4 positions only: prompts longer than the window, decoded in one
    batch at different lengths, give the tokens each gives alone and transformers' step-by-step argmax."""
    hf, ours = hf_mistral_pair(tmp_path, window=4)
    params = SamplingParams(max_new_tokens=10, temperature=0, stop_at_eos=False)
    prompts = [p for p in PROMPTS if len(p) > 4] + [[9, 8, 7, 6, 5]]
    outputs = run_all(Engine(ours, max_batch=len(prompts)), [Request(p, params, id=str(i))
                                                              for i, p in enumerate(prompts)])
    for i, prompt in enumerate(prompts):
        expected = greedy_without_cache(lambda ids: hf(ids).logits, prompt, 10)
        assert tokens_of(outputs[str(i)]) == alone(ours, prompt, params) == expected, i


def test_a_one_token_request_ends_with_one_output():
    """max_new_tokens=1 ends in the prefill step with exactly one output, carrying the token and the finish."""
    model = model64("gpt2-tiny")
    params = SamplingParams(max_new_tokens=1, temperature=0, stop_at_eos=False)
    outputs = run_all(Engine(model, max_batch=2), [Request(PROMPTS[0], params, id="0")])["0"]
    assert [(len(o.token_ids), o.finish_reason) for o in outputs] == [(1, "length")]


def test_beam_search_advances_one_token_per_step_beside_a_greedy_request():
    """A beam request takes its rows in the running batch and moves one token per engine step, so a greedy
    request added with it keeps producing tokens; both end as they would alone, the beams as transformers'."""
    hf, ours = hf_gpt2_pair()
    beam = Request(PROMPTS[0], SamplingParams(num_beams=3, max_new_tokens=8, stop_at_eos=False), id="0")
    greedy = Request(PROMPTS[1], SamplingParams(max_new_tokens=8, temperature=0, stop_at_eos=False), id="1")
    engine = Engine(ours, max_batch=4)
    engine.add(beam)
    engine.add(greedy)
    outputs: dict[str, list[Output]] = {"0": [], "1": []}
    for _ in range(3):
        for out in engine.step():
            outputs[out.request.id].append(out)
    # each step: the prefill's token (first step only) and one decoded token, for the greedy row and the beams
    assert len(tokens_of(outputs["1"])) == 4
    assert not beam.finished and beam.beam.steps == 4 and len(beam.beam.running[0]) == 4
    while engine.has_work:
        for out in engine.step():
            outputs[out.request.id].append(out)
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        expected = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, num_beams=3,
                               max_new_tokens=8, pad_token_id=0, eos_token_id=None)[0, len(PROMPTS[0]):].tolist()
    assert tokens_of(outputs["0"]) == expected == alone(ours, beam.prompt_ids, beam.params)
    assert tokens_of(outputs["1"]) == alone(ours, greedy.prompt_ids, greedy.params)


def test_beam_and_greedy_requests_joining_and_leaving_keep_their_rows():
    """Beams of different widths and greedy requests join at different steps, wait for enough free rows and
    leave in any order (rows shift down or the last request fills the hole); each equals its run alone."""
    _, ours = hf_gpt2_pair()
    settings = [dict(max_new_tokens=2, temperature=0), dict(num_beams=3, max_new_tokens=9),
                dict(max_new_tokens=5, temperature=0), dict(num_beams=2, max_new_tokens=6),
                dict(max_new_tokens=4, temperature=0, repetition_penalty=1.5)]
    requests = [Request(PROMPTS[i % len(PROMPTS)], SamplingParams(stop_at_eos=False, **s), id=str(i))
                for i, s in enumerate(settings)]
    outputs = run_all(Engine(ours, max_batch=6), requests, join_after={0: 0, 1: 0, 2: 0, 3: 1, 4: 3})
    for i, r in enumerate(requests):
        assert tokens_of(outputs[str(i)]) == alone(ours, r.prompt_ids, r.params), i
        assert len(tokens_of(outputs[str(i)])) == r.params.max_new_tokens


def test_default_max_model_len_fits_a_quarter_of_free_memory(monkeypatch, caplog):
    """A 131k-context model (Llama-3.2-1B's shape, fp32) with 16 rows would need a 128 GiB cache; by default the
    engine plans a shorter max_model_len whose cache fits a quarter of the free memory, and logs both. Built
    on the meta device, so nothing is allocated."""
    import logging

    from lmforge.config import preset
    from lmforge.infer import cache
    from lmforge.infer.cache import GiB, kv_bytes

    with torch.device("meta"):
        model = GPT(preset("llama-3.2-1b"))
    assert kv_bytes(model.config, 16, 131072, torch.float32) == 128 * GiB
    monkeypatch.setattr(cache, "available_memory", lambda device: 64 * GiB)
    with caplog.at_level(logging.INFO, logger="lmforge.infer"):
        engine = Engine(model, max_batch=16)
    assert engine.max_model_len == 16384
    assert engine.cache_bytes == 16 * GiB == sum(t.numel() * t.element_size() for t in
                                                 engine.cache.keys + engine.cache.values)
    assert "max_model_len 16384" in caplog.text and "16.00 GiB" in caplog.text
    small = conftest.random_gpt("gpt2-tiny", VOCAB)
    assert Engine(small, max_batch=16).max_model_len == small.config.max_position_embeddings


def test_a_request_longer_than_max_model_len_is_a_config_error():
    model = model64("gpt2-tiny")
    engine = Engine(model, max_batch=2, max_model_len=16)
    engine.add(Request(PROMPTS[0], SamplingParams(max_new_tokens=9)))  # 7 + 9 fits exactly
    with pytest.raises(ConfigError, match=r"needs 17 positions, more than max_model_len=16"):
        engine.add(Request(PROMPTS[0], SamplingParams(max_new_tokens=10)))
    with pytest.raises(ConfigError, match="max_model_len=999 must be between 1 and the model's context"):
        Engine(model, max_model_len=999)
