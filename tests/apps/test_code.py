"""`lmforge code`: the FIM prompt at a cursor, block-end stopping, `check`'s errors and surprise, tests kept
only when they pass in the sandbox, and `/v1/completions` with a suffix."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import openai
import pytest
import torch
from conftest import greedy_text, random_gpt, running_server

from lmforge.apps.code import (
    block_end,
    check_source,
    complete_at,
    cursor_offset,
    generate_tests,
    token_surprise,
)
from lmforge.apps.code import tests as write_tests  # not `tests`: pytest would collect it
from lmforge.cli import main
from lmforge.errors import ConfigError
from lmforge.eval.sandbox import Limits, run_python
from lmforge.infer.server import create_app
from lmforge.lm import LM
from lmforge.tokenizer import Tokenizer, train_tokenizer

MODULE = '''def add(a, b):
    return a + b


def clamp(x, lo, hi):
    if x < lo:
        return lo
    return min(x, hi)
'''


@pytest.fixture(scope="module")
def fim_lm(tmp_path_factory: pytest.TempPathFactory) -> LM:
    """A random tiny model whose tokenizer, trained on .py files, has the FIM sentinels."""
    root = tmp_path_factory.mktemp("code")
    for i in range(20):
        (root / f"m{i}.py").write_text(MODULE.replace("add", f"add{i}"), encoding="utf-8")
    tok = Tokenizer.load(train_tokenizer(root, tmp_path_factory.mktemp("tok"), vocab_size=320))
    assert tok.fim is not None
    return LM(random_gpt("gpt2-tiny", tok.vocab_size), tok)


def isolated() -> bool:
    try:
        run_python("pass", Limits(timeout=10))
        return True
    except ConfigError:
        return False


def test_cursor_offsets_are_one_based() -> None:
    src = "ab\ncdef\n"
    assert cursor_offset(src, 2, 1) == 3 and cursor_offset(src, 2) == 7 and cursor_offset(src, 3) == 8
    with pytest.raises(ConfigError, match="column"):
        cursor_offset(src, 1, 5)


def test_block_end_stops_where_the_block_does() -> None:
    prefix = "def f(x):\n"
    middle, cut = block_end("    y = x\n    return y\n\ndef g():\n", prefix, "")
    assert cut and middle == "    y = x\n    return y\n\n"
    assert block_end("x + 1)\nmore\n", "    return f(", ")\n") == ("x + 1)", True)  # mid-line: the line
    assert block_end("    a = 1\n    b = 2\n", prefix, "", max_lines=1) == ("    a = 1\n", True)
    assert block_end("    a = 1", prefix, "") == ("    a = 1", False)  # unfinished: all of it
    # the cursor at the end of the line that opens the block (`--line N` with no column): its body is kept
    assert block_end("\n    return x + 1\n\ndef h():\n", "def f(x):", "\n\ndef g():\n") == (
        "\n    return x + 1\n\n", True)


def test_complete_asks_with_the_training_layout_and_cuts_the_block(fim_lm: LM, monkeypatch) -> None:
    """The prompt is <PRE> prefix <SUF> suffix <MID> with each side encoded alone (as packing wrote them), and
    the generated middle is cut at the end of the block."""
    tok, seen = fim_lm.tokenizer, {}

    def fake_stream(ids, **kw):
        seen["ids"], seen["stop"] = ids, kw["stop"]
        yield from ["    return ", "a * b\n", "\n\ndef other():\n    pass\n"]

    monkeypatch.setattr(fim_lm, "stream", fake_stream)
    source = "def mul(a, b):\n\n\nprint(mul(2, 3))\n"
    middle = complete_at(fim_lm, source, 2, 1)
    assert middle == "    return a * b\n\n\n"
    f = tok.fim
    prefix, suffix = "def mul(a, b):\n", "\n\nprint(mul(2, 3))\n"
    assert seen["ids"] == [f.prefix, *tok.encode(prefix), f.suffix, *tok.encode(suffix), f.middle]
    assert set(f.names) <= set(seen["stop"])
    middle = complete_at(fim_lm, source, 2, 1, fim=False)  # left to right: the prefix alone, healed
    assert seen["ids"] == tok.encode("def mul(a, b):")


def test_left_to_right_at_a_line_start_lets_the_model_write_the_newline(fim_lm: LM, monkeypatch) -> None:
    """Byte-level BPE joins a newline with the indentation after it, so a prompt ending in a lone newline token
    is out of distribution: the prompt stops before the newline, and what the model writes again of the prefix
    (the newline, the indentation already typed) is not part of the answer."""
    seen = {}

    def fake_stream(ids, **kw):
        seen["ids"] = ids
        yield from ["\n   ", " total = 0\n", "    for x in xs:\n"]

    monkeypatch.setattr(fim_lm, "stream", fake_stream)
    tok = fim_lm.tokenizer
    source = "def f(xs):\n\n    return total\n"
    assert complete_at(fim_lm, source, 2, 1, fim=False, lines=1) == "    total = 0\n"
    assert seen["ids"] == tok.encode("def f(xs):")
    source = "def f(xs):\n    \n    return total\n"  # the indentation already typed: only the rest is new
    assert complete_at(fim_lm, source, 2, 5, fim=False, lines=1) == "total = 0\n"
    assert seen["ids"] == tok.encode("def f(xs):")
    assert complete_at(fim_lm, "def f(xs):\n    return x", 2, 11, fim=False) == ""  # mid-line: no healing
    assert seen["ids"] == tok.encode("def f(xs):\n    return")


def test_complete_with_random_weights_equals_greedy_decoding(fim_lm: LM) -> None:
    """Through the engine, the middle is the greedy continuation of the FIM prompt (up to the block's end)."""
    tok, f = fim_lm.tokenizer, fim_lm.tokenizer.fim
    source = "def mul(a, b):\n    return a\n"
    middle = complete_at(fim_lm, source, 2, 13, max_new_tokens=6)
    ids = [f.prefix, *tok.encode("def mul(a, b):\n    return a"), f.suffix, *tok.encode("\n"), f.middle]
    reference = greedy_text(fim_lm.model, tok, ids, 6, {tok.eos_id, f.prefix, f.suffix, f.middle})
    assert middle == reference.split("\n")[0]


def test_check_reports_errors_and_ranks_surprising_lines(fim_lm: LM) -> None:
    broken = "def f(x):\n    return x +\n"
    report = check_source(fim_lm, broken)
    assert report["errors"][0]["kind"] == "error" and report["errors"][0]["line"] == 2
    assert report["errors"][0]["column"] >= 12
    report = check_source(fim_lm, MODULE)
    assert report["errors"] == []
    bits = [r["max_bits"] for r in report["lines"]]
    assert bits == sorted(bits, reverse=True)
    assert {r["line"] for r in report["lines"]} == {i + 1 for i, x in enumerate(MODULE.split("\n")) if x.strip()}


def test_token_surprise_is_the_models_log_probability(fim_lm: LM) -> None:
    """Per-token bits equal -log2 of `LM.logprobs`, and text longer than the context is scored in windows."""
    text = "def add(a, b):\n    return a + b\n"
    ref = fim_lm.logprobs(text)
    got = token_surprise(fim_lm, text)
    assert len(got) == len(ref)
    for (_, _, bits), (_, lp) in zip(got, ref):
        assert math.isclose(bits, -lp / math.log(2), rel_tol=1e-4, abs_tol=1e-4)
    long = MODULE * 12
    scored = token_surprise(fim_lm, long)
    assert len(scored) == len(fim_lm.tokenizer.encode(long)) > fim_lm.config.max_position_embeddings
    assert all(v > 0 for _, _, v in scored)


class CannedLM:
    """Stands in for a model: the completions a test generator could write (passing, failing, broken)."""

    def __init__(self, completions: list[str]) -> None:
        self.completions = completions

    def generate(self, prompts: list[str], **kw) -> list[str]:
        assert all(p.rstrip().endswith("assert add(") or p.rstrip().endswith("assert clamp(") for p in prompts)
        return [self.completions[i % len(self.completions)] for i in range(len(prompts))]


def test_tests_keep_only_what_passes_in_the_sandbox(tmp_path: Path) -> None:
    canned = ["1, 2) == 3\n\n\n# done", "1, 2) == 4\n", "1, 2 ==\n", "1, 2) == 3\n", "undefined_name) == 1\n"]
    result = generate_tests(CannedLM(canned), MODULE, "mymod", samples=5, isolate=isolated())
    # add: passes / wrong value / syntax / duplicate / NameError; clamp(1, 2) == 3 is a TypeError
    assert result["kept"] == ["test_add_1"]
    assert result["dropped"]["test_add_2"].startswith("failed")
    assert result["dropped"]["test_add_3"].startswith("does not parse")
    assert result["dropped"]["test_add_4"] == "duplicate"
    assert result["dropped"]["test_add_5"].startswith("failed")
    assert "test_clamp_1" in result["dropped"]
    (tmp_path / "mymod.py").write_text(MODULE)
    (tmp_path / "test_mymod.py").write_text(result["file"])
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_mymod.py"],
                         cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0 and "1 passed" in run.stdout, run.stdout


def test_tests_verb_keeps_the_rule_for_its_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`code tests` refuses to replace a test file someone wrote, and writes none when no test passed."""
    monkeypatch.setattr("lmforge.apps.code._lm", lambda model, device=None: model)
    module = tmp_path / "mymod.py"
    module.write_text(MODULE)
    written = tmp_path / "test_mymod.py"
    written.write_text("def test_mine():\n    pass\n")
    with pytest.raises(ConfigError, match="--overwrite"):
        write_tests(CannedLM(["1, 2) == 3\n"]), module, samples=1, unsafe_no_sandbox=not isolated())
    assert written.read_text() == "def test_mine():\n    pass\n"
    out = tmp_path / "test_none.py"
    said = write_tests(CannedLM(["1, 2) == 4\n"]), module, out=out, samples=1, unsafe_no_sandbox=not isolated())
    assert "nothing written" in said and not out.exists()
    said = write_tests(CannedLM(["1, 2) == 3\n"]), module, out=written, samples=1, overwrite=True,
                 unsafe_no_sandbox=not isolated())
    assert said.startswith("kept 1 of") and "def test_add_1" in written.read_text()
    fresh = tmp_path / "new" / "tests" / "test_mymod.py"  # a folder that does not exist yet is made
    said = write_tests(CannedLM(["1, 2) == 3\n"]), module, out=fresh, samples=1, unsafe_no_sandbox=not isolated())
    assert said.startswith("kept 1 of") and "def test_add_1" in fresh.read_text()


def test_cli_check_and_complete(fim_lm: LM, tmp_path: Path, capsys) -> None:
    ckpt = fim_lm.save(tmp_path / "ckpt")
    (tmp_path / "app.py").write_text("def f(x):\n    return x +\n")
    assert main(["code", "check", "--model", str(ckpt), str(tmp_path / "app.py")]) == 0
    out = capsys.readouterr().out
    assert f"{tmp_path / 'app.py'}:2:" in out and "error" in out and "least probable" in out
    assert main(["code", "complete", "--model", str(ckpt), "--file", str(tmp_path / "app.py"), "--line", "2",
                 "--max-new-tokens", "4"]) == 0


def test_server_suffix_fills_the_middle(fim_lm: LM) -> None:
    """`suffix` on /v1/completions asks with the FIM prompt: the reply is greedy decoding of it."""
    tok, f = fim_lm.tokenizer, fim_lm.tokenizer.fim
    with running_server(create_app(fim_lm, name="tiny")) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)
        reply = client.completions.create(model="tiny", prompt="def add(a, b):\n    return ", suffix="\n",
                                          max_tokens=5, temperature=0)
    ids = [f.prefix, *tok.encode("def add(a, b):\n    return "), f.suffix, *tok.encode("\n"), f.middle]
    with torch.no_grad():
        expected = greedy_text(fim_lm.model, tok, ids, 5, {tok.eos_id, f.prefix, f.suffix, f.middle})
    assert reply.choices[0].text == expected
