"""`lmforge VERB ...`: help from docstrings, option spellings, YAML configs, clean errors, and the chain end to end."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import docstring_parser
import pytest
from conftest import run_cli as run

import lmforge
import lmforge.infer.generate
from lmforge.cli import verbs
from lmforge.config import PRESETS
from lmforge.model.seq2seq import SEQ2SEQ_PRESETS
from lmforge.tokenizer import Tokenizer

VERB_ARGS = {
    "tokenizer train": ["tokenizer", "train"],
    "data pack": ["data", "pack"],
    "pretrain": ["pretrain"],
    "finetune full": ["finetune", "full"],
    "finetune lora": ["finetune", "lora"],
    "finetune classify": ["finetune", "classify"],
    "finetune regress": ["finetune", "regress"],
    "eval perplexity": ["eval", "perplexity"],
    "export gguf": ["export", "gguf"],
    "export onnx": ["export", "onnx"],
    "generate": ["generate"],
    "demo": ["demo"],
    "models": ["models"],
}


def verb_function(args: list[str]) -> Callable:
    table = verbs()
    return table[args[0]][args[1]] if len(args) == 2 else table[args[0]]




def words(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize("verb", VERB_ARGS)
def test_help_shows_the_docstring_summary_and_argument_descriptions(
        verb: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """`lmforge VERB --help` exits 0 and prints the function's first docstring line and each Args description."""
    monkeypatch.setenv("COLUMNS", "500")  # no wrapping inside a description (argparse breaks at hyphens)
    fn = verb_function(VERB_ARGS[verb])
    doc = docstring_parser.parse(inspect.getdoc(fn))
    code, out, _ = run([*VERB_ARGS[verb], "--help"], capsys)
    assert code == 0
    assert words(doc.short_description) in words(out)
    for param in doc.params:
        assert words(param.description) in words(out), param.arg_name
    assert (len(doc.params) > 0) == (verb != "models")


@pytest.mark.slow
def test_installed_script_help_lists_the_verbs() -> None:
    """The `lmforge` console script (what pip installs) runs, exits 0 on --help and names every verb."""
    script = Path(sys.executable).with_name("lmforge")
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for verb in ("tokenizer", "data", "pretrain", "eval", "generate", "demo", "models"):
        assert verb in result.stdout


@pytest.mark.parametrize("spelling", ["--vocab-size", "--vocab_size", "--vocab-size=", "--vocab_size="])
def test_options_work_with_dashes_or_underscores(
        spelling: str, tiny_corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--vocab-size 300`, `--vocab_size 300` and their `=` forms all set vocab_size."""
    value = [spelling + "300"] if spelling.endswith("=") else [spelling, "300"]
    code, _, err = run(["tokenizer", "train", "--data", str(tiny_corpus), "--out", str(tmp_path / "tok"),
                        *value], capsys)
    assert code == 0, err
    assert Tokenizer.load(tmp_path / "tok").vocab_size == 300


def test_option_values_that_start_with_dashes_are_passed_unchanged(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A prompt beginning with `--` and containing dashes reaches generate exactly as typed."""

    class Echo:
        is_seq2seq = True  # no context to fit the prompt to

        def require_decoder(self, verb: str) -> None:
            pass

        def generate(self, prompt: str, **sampling: object) -> str:
            return f"prompt={prompt!r}"

    monkeypatch.setattr(lmforge.infer.generate, "load", lambda *args, **kwargs: Echo())
    code, out, err = run(["generate", "--model", "ckpt", "--prompt", "--dry-run twice"], capsys)
    assert code == 0, err
    assert out.strip() == "prompt='--dry-run twice'"


def test_yaml_config_sets_options_and_a_later_flag_overrides_it(
        tiny_corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """tokenizer train: vocab_size comes from --config YAML, unless the command line gives it after --config."""
    (tmp_path / "tok.yaml").write_text(f"data: {tiny_corpus}\nvocab_size: 290\n")
    code, _, err = run(["tokenizer", "train", "--config", str(tmp_path / "tok.yaml"), "--out", str(tmp_path / "a")],
                       capsys)
    assert code == 0, err
    assert Tokenizer.load(tmp_path / "a").vocab_size == 290
    code, _, err = run(["tokenizer", "train", "--config", str(tmp_path / "tok.yaml"), "--out", str(tmp_path / "b"),
                        "--vocab-size", "310"], capsys)
    assert code == 0, err
    assert Tokenizer.load(tmp_path / "b").vocab_size == 310


def test_yaml_config_sets_pack_val_fraction_and_a_later_flag_overrides_it(
        tiny_corpus: Path, tiny_tokenizer_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """data pack: val_fraction from YAML lands in meta.json; `--val-fraction` after --config wins."""
    (tmp_path / "pack.yaml").write_text("val_fraction: 0.5\nworkers: 1\n")
    base = ["data", "pack", "--config", str(tmp_path / "pack.yaml"), "--data", str(tiny_corpus),
            "--tokenizer", str(tiny_tokenizer_dir)]
    code, _, err = run([*base, "--out", str(tmp_path / "a")], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "a" / "meta.json").read_text())["val_fraction"] == 0.5
    code, _, err = run([*base, "--out", str(tmp_path / "b"), "--val-fraction", "0.25"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "b" / "meta.json").read_text())["val_fraction"] == 0.25


def test_unknown_option_exits_nonzero_naming_it(tiny_corpus: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An option the verb does not have is refused with a non-zero exit and its name on stderr."""
    code, _, err = run(["tokenizer", "train", "--data", str(tiny_corpus), "--bogus", "1"], capsys)
    assert code != 0
    assert "--bogus" in err


@pytest.mark.parametrize(("args", "option"), [
    (["tokenizer", "train", "--data", "corpus", "--vocab-size", "abc"], "--vocab-size"),
    (["pretrain", "--data", "packed", "--precision", "16"], "precision"),
    (["pretrain", "--data", "packed", "--optimizer", "lion"], "optimizer"),
])
def test_bad_option_value_exits_nonzero_naming_the_option(
        args: list[str], option: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A value of the wrong type or outside a Literal's choices is refused before anything runs, naming the option."""
    code, _, err = run(args, capsys)
    assert code != 0
    assert option in err


def test_lmforge_error_exits_2_with_message_and_no_traceback(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A user error (a missing corpus path) prints `error: <path>: ...` on stderr and exits 2, no traceback."""
    missing = tmp_path / "no-such-corpus"
    code, out, err = run(["tokenizer", "train", "--data", str(missing), "--out", str(tmp_path / "tok")], capsys)
    assert code == 2
    assert f"error: {missing}" in err
    assert "Traceback" not in err + out
    assert not (tmp_path / "tok").exists()


def test_models_lists_every_preset(capsys: pytest.CaptureFixture[str]) -> None:
    """`lmforge models` prints a header and then one row per preset, in the preset table's order; then the
    encoder-decoder presets; then the baselines (LSTM presets, n-gram orders)."""
    code, out, _ = run(["models"], capsys)
    assert code == 0
    transformers, encoder_decoders, baselines = out.strip().split("\n\n")
    listed = [line.split()[0] for line in transformers.splitlines()[1:]]
    assert listed == list(PRESETS)
    assert [line.split()[0] for line in encoder_decoders.splitlines()[1:]] == list(SEQ2SEQ_PRESETS)
    assert [line.split()[0] for line in baselines.splitlines()[1:]] == ["lstm-tiny", "lstm-small", "ngram-N"]


@pytest.mark.slow
def test_cli_chain_tokenizer_pack_pretrain_eval_generate(
        tiny_corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """tokenizer train → data pack → pretrain → eval perplexity → generate, all through `main`, end to end."""
    tok, packed, ckpt = tmp_path / "tok", tmp_path / "packed", tmp_path / "run"
    code, _, err = run(["tokenizer", "train", "--data", str(tiny_corpus), "--out", str(tok), "--vocab-size", "300"],
                       capsys)
    assert code == 0, err
    code, _, err = run(["data", "pack", "--data", str(tiny_corpus), "--tokenizer", str(tok), "--out", str(packed),
                        "--val-fraction", "0.1", "--workers", "1"], capsys)
    assert code == 0, err
    code, out, err = run(["pretrain", "--data", str(packed), "--model", "gpt2-tiny", "--out", str(ckpt),
                          "--max-steps", "3", "--batch-size", "2", "--block-size", "32", "--warmup-steps", "0",
                          "--precision", "32", "--eval-batches", "1", "--log-every", "1", "--progress", "false",
                          "--device", "cpu"], capsys)
    assert code == 0, err
    assert out.strip() == str(ckpt)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", "train_state.pt", "metrics.jsonl"):
        assert (ckpt / name).is_file(), name
    steps = [json.loads(line).get("step") for line in (ckpt / "metrics.jsonl").read_text().splitlines()]
    assert {1, 2, 3} <= set(steps)

    code, out, err = run(["eval", "perplexity", "--model", str(ckpt), "--data", str(packed), "--block-size", "32",
                          "--progress", "false", "--device", "cpu"], capsys)
    assert code == 0, err
    lm = lmforge.load(ckpt, device="cpu")  # the trained checkpoint's numbers, as the Python API computes them
    assert json.loads(out) == lm.perplexity(packed, block_size=32, progress=False)

    code, out, err = run(["generate", "--model", str(ckpt), "--prompt", "The model", "--seed", "0",
                          "--max-new-tokens", "5", "--device", "cpu"], capsys)
    assert code == 0, err
    assert out == lm.generate("The model", seed=0, max_new_tokens=5) + "\n"  # the completion, as one string


def test_dotted_options_take_dashes_too() -> None:
    from lmforge.cli import normalize_options

    assert normalize_options(["--normalize.fix-mojibake", "false", "--filters.min-words=3"]) == [
        "--normalize.fix_mojibake", "false", "--filters.min_words=3"]


@pytest.mark.parametrize("argv, expected", [
    (["convert", "from-hf", "hf/", "--out", "o"], ["convert", "from-hf", "--path", "hf/", "--out", "o"]),
    (["eval", "compare", "a.json", "b.json", "c.json"],
     ["eval", "compare", "--reports", '["a.json", "b.json", "c.json"]']),
    (["data", "merge-labels", "p.jsonl", "r.csv", "--output", "x"],
     ["data", "merge-labels", "--prelabeled", "p.jsonl", "--reviewed", "r.csv", "--output", "x"]),
    (["merge-lora", "--adapter", "runs/l"], ["merge-lora", "--adapter", "runs/l"]),
])
def test_leading_bare_arguments_become_their_options(argv: list[str], expected: list[str]) -> None:
    from lmforge.cli import positional_shorthand

    assert positional_shorthand(argv) == expected
