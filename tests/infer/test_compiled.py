"""The compiled decode step equals the eager engine: same tokens for one row, for rows at different lengths
(one graph for any number of rows), after the weights change, and through `lmforge.load(compile=True)` and the CLI."""

from __future__ import annotations

import copy

import conftest
import pytest
import torch
from test_engine import PROMPTS, VOCAB, run_all, tokens_of

from lmforge.cli import main
from lmforge.infer.compiled import CompiledStep
from lmforge.infer.engine import Engine, Request
from lmforge.infer.sampling import SamplingParams
from lmforge.lm import load

GREEDY = SamplingParams(max_new_tokens=10, temperature=0, stop_at_eos=False)


def decode(model: torch.nn.Module, prompts: list[list[int]], compile: bool, engine: Engine | None = None
           ) -> tuple[list[list[int]], Engine]:
    engine = engine or Engine(model, max_batch=4, max_model_len=64, compile=compile)
    requests = [Request(p, GREEDY, id=str(i)) for i, p in enumerate(prompts)]
    outputs = run_all(engine, requests)
    return [tokens_of(outputs[str(i)]) for i in range(len(prompts))], engine


@pytest.mark.parametrize("name", ["gpt2-tiny", "qwen3-tiny"])
def test_compiled_step_equals_eager(name):
    """float64 (far below any argmax near-tie): three rows at different lengths, then one row through the
    same graph, give the eager engine's tokens; the step really is the compiled one."""
    model = conftest.random_gpt(name, VOCAB).double().eval()
    eager, _ = decode(model, PROMPTS[:3], compile=False)
    compiled, engine = decode(model, PROMPTS[:3], compile=True)
    assert isinstance(engine.compiled, CompiledStep)
    assert compiled == eager
    alone, _ = decode(model, PROMPTS[:1], compile=False)
    assert decode(model, PROMPTS[:1], compile=True, engine=engine)[0] == alone


def test_compiled_step_follows_changed_weights():
    """Weights are frozen into the graph, so an optimizer step (an in-place change) must rebuild it."""
    model = conftest.random_gpt("gpt2-tiny", VOCAB).double().eval()
    _, engine = decode(model, PROMPTS[:1], compile=True)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    assert engine.compiled.stale
    eager, _ = decode(model, PROMPTS[:1], compile=False)
    assert decode(model, PROMPTS[:1], compile=True, engine=engine)[0] == eager


def test_compiled_bf16_logits_match_eager():
    """bfloat16 through inductor's own matrix kernels: the greedy tokens equal eager's, and the last step's
    logits are as close to a float64 forward as eager's are (inductor keeps float32 inside a fused kernel
    where eager rounds every op to bf16, so the two differ from each other at bf16's rounding)."""
    model = conftest.random_gpt("llama-tiny", VOCAB, std=0.3).to(torch.bfloat16).eval()
    exact = copy.deepcopy(model).double()  # the same (bf16-rounded) weights in float64
    eager, _ = decode(model, [PROMPTS[0]], compile=False)
    compiled, engine = decode(model, [PROMPTS[0]], compile=True)
    assert compiled == eager
    sequence = PROMPTS[0] + eager[0]
    with torch.inference_mode():
        reference = exact(torch.tensor([sequence[:-1]]))[0, -1]
        idx, positions = torch.tensor([[sequence[-2]]]), torch.tensor([len(sequence) - 2])
        engine.cache.prepare(slice(0, 1), positions.tolist(), 1)
        eager_logits = engine._logits(idx, positions[:, None], None).double()[0]
        compiled_logits = engine.compiled(idx, positions).double()[0]
    eager_error = (eager_logits - reference).abs().max().item()
    assert (compiled_logits - reference).abs().max().item() <= 1.5 * eager_error + 1e-3


def test_load_compile_and_cli(make_checkpoint, tmp_path, capsys):
    """`lmforge.load(..., compile=True)` decodes through the compiled step with the eager tokens, and the
    CLI's `generate --compile true --dtype float32` prints the same text as the Python call."""
    path = make_checkpoint("gpt2-tiny", out=tmp_path / "ckpt")
    eager = load(path).generate("the cat", max_new_tokens=8, temperature=0)
    lm = load(path, compile=True)
    assert lm.generate("the cat", max_new_tokens=8, temperature=0) == eager
    assert lm.engine.compiled is not None
    main(["generate", "--model", str(path), "--prompt", "the cat", "--max-new-tokens", "8", "--temperature", "0",
          "--dtype", "float32", "--compile", "true"])
    assert eager in capsys.readouterr().out


def test_auto_dtype_is_bfloat16_where_fast(make_checkpoint, tmp_path):
    """`dtype="auto"` (the inference verbs' default) loads bf16 where this CPU has AMX, else the checkpoint's own."""
    from lmforge.precision import inference_dtype

    path = make_checkpoint("gpt2-tiny", out=tmp_path / "ckpt")
    expected = inference_dtype("auto", "cpu") or torch.float32
    assert next(load(path, dtype="auto").model.parameters()).dtype == expected
    assert next(load(path).model.parameters()).dtype == torch.float32


def test_server_compiles_before_listening_and_answers_as_eager(make_checkpoint, tmp_path):
    """A compiling server warms both graphs (one row, several) up at start; its completions equal eager's."""
    import json
    import urllib.request

    from conftest import running_server

    from lmforge.infer.server import create_app

    path = make_checkpoint("gpt2-tiny", out=tmp_path / "ckpt")
    eager = load(path).generate(["the cat", "a dog sat"], max_new_tokens=6, temperature=0)
    lm = load(path, compile=True)
    app = create_app(lm, name="tiny", max_batch=4)
    assert app.state.service.engine.compiled._compiled_once  # warmed up in create_app, before any request
    with running_server(app) as base:
        for prompt, expected in zip(["the cat", "a dog sat"], eager):
            body = json.dumps({"model": "tiny", "prompt": prompt, "max_tokens": 6, "temperature": 0}).encode()
            request = urllib.request.Request(f"{base}/v1/completions", body, {"Content-Type": "application/json"})
            with urllib.request.urlopen(request) as reply:
                assert json.load(reply)["choices"][0]["text"] == expected


def test_int8_model_compiles_and_decodes_as_eager():
    """A quantized model (int8 layers with their packed kernels) compiles rather than falling back to eager,
    and starts with the eager tokens (in bf16 on random weights the two part after ~7 greedy tokens: inductor
    keeps float32 inside its fused norms where eager rounds every op to bf16)."""
    from lmforge.model.quant import quantize_model

    model = conftest.random_gpt("llama-tiny", VOCAB, std=0.3).to(torch.bfloat16).eval()
    quantize_model(model, "int8")
    eager, _ = decode(model, [PROMPTS[0]], compile=False)
    compiled, engine = decode(model, [PROMPTS[0]], compile=True)
    assert engine.compiled is not None and engine.compiled._compiled_once
    assert compiled[0][:5] == eager[0][:5]


def test_a_model_that_does_not_compile_decodes_eagerly(caplog):
    """int4 layers (a data-pointer check dynamo refuses) do not compile: the engine says so once and decodes
    eagerly, with the eager tokens, instead of failing the request."""
    from lmforge.model.quant import quantize_model

    model = conftest.random_gpt("llama-tiny", VOCAB, std=0.3).to(torch.bfloat16).eval()
    quantize_model(model, "int4", group_size=32)
    eager, _ = decode(model, [PROMPTS[0]], compile=False)
    with caplog.at_level("WARNING", logger="lmforge.infer"):
        compiled, engine = decode(model, [PROMPTS[0]], compile=True)
    assert engine.compiled is None and "decoding eagerly" in caplog.text
    assert compiled == eager
