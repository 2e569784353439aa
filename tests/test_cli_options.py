"""One vocabulary of options, one overwrite rule and errors in plain words, across every verb (issue 17)."""

from __future__ import annotations

import ast
import csv
import inspect
import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from conftest import run_cli as run

import lmforge
import lmforge.infer.generate
from lmforge.checkpoint import save_checkpoint
from lmforge.cli import apply_aliases, verbs
from lmforge.errors import ConfigError, DataError
from lmforge.model.bert import Encoder, EncoderConfig

LMFORGE = Path(lmforge.__file__).parent




def verb(*words: str):
    node = verbs()
    for w in words:
        node = node[w]
    return node


def params(*words: str) -> set[str]:
    return set(inspect.signature(verb(*words)).parameters)


# --- one vocabulary ---------------------------------------------------------------------------------------

READERS = [("tokenizer", "train"), ("data", "pack"), ("data", "clean"), ("data", "dedup"), ("data", "stats"),
           ("data", "validate"), ("data", "annotate"), ("eval", "perplexity"), ("predict",), ("pretrain",)]
WRITERS = [("tokenizer", "train"), ("data", "pack"), ("data", "clean"), ("data", "dedup"), ("data", "stats"),
           ("data", "annotate"), ("data", "merge-labels"), ("predict",), ("eval", "run"), ("merge-lora",),
           ("pretrain",), ("finetune", "lora"), ("plot",)]
TEXT = [("tokenizer", "train"), ("data", "pack"), ("data", "clean"), ("data", "dedup"), ("data", "stats"),
        ("data", "annotate"), ("data", "merge-labels"), ("eval", "perplexity"), ("predict",)]
INFERENCE = [("generate",), ("chat",), ("serve",), ("eval", "perplexity"), ("eval", "run"), ("predict",)]
TRAINING = [("pretrain",), ("finetune", "full"), ("finetune", "lora"), ("finetune", "classify"),
            ("finetune", "regress")]


@pytest.mark.parametrize("words", READERS, ids=" ".join)
def test_every_verb_reads_its_input_from_data(words: tuple[str, ...]) -> None:
    assert "data" in params(*words) and not {"input", "path"} & params(*words)


@pytest.mark.parametrize("words", WRITERS, ids=" ".join)
def test_every_verb_writes_to_out(words: tuple[str, ...]) -> None:
    assert "out" in params(*words) and "output" not in params(*words)


@pytest.mark.parametrize("words", TEXT, ids=" ".join)
def test_every_verb_names_the_text_column_text_field(words: tuple[str, ...]) -> None:
    assert "text_field" in params(*words) and "field" not in params(*words)


@pytest.mark.parametrize("words", INFERENCE, ids=" ".join)
def test_inference_verbs_take_dtype_and_training_verbs_precision(words: tuple[str, ...]) -> None:
    assert "dtype" in params(*words) and "precision" not in params(*words)


@pytest.mark.parametrize("words", TRAINING, ids=" ".join)
def test_training_verbs_take_precision(words: tuple[str, ...]) -> None:
    assert "precision" in params(*words) and "dtype" not in params(*words)


def test_old_spellings_stay_aliases() -> None:
    """--input/--path → --data, --output → --out, --field → --text-field, and eval perplexity's old --precision
    values become its --dtype; a verb that has the old name keeps it."""
    stats = verb("data", "stats")
    assert apply_aliases(["data", "stats", "--input", "x", "--output=y"], stats) == [
        "data", "stats", "--data", "x", "--out=y"]
    assert apply_aliases(["data", "validate", "--path", "x"], verb("data", "validate"))[2] == "--data"
    ppl = verb("eval", "perplexity")
    assert apply_aliases(["--field", "body", "--precision", "32"], ppl) == [
        "--text_field", "body", "--dtype", "float32"]
    assert apply_aliases(["--precision=bf16-mixed"], ppl) == ["--dtype=bfloat16"]
    assert apply_aliases(["--precision", "32"], verb("pretrain")) == ["--precision", "32"]
    assert apply_aliases(["--overwrite"], stats) == ["--overwrite", "true"]


def test_old_and_new_spellings_run_the_same(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`data stats --input F --output D` (old) and `data stats F --out D` (positional, new) write the same report."""
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"body": f"document number {i} about cats"}) + "\n" for i in range(6)))
    old = ["data", "stats", "--input", str(corpus), "--output", str(tmp_path / "a"), "--field", "body"]
    new = ["data", "stats", str(corpus), "--out", str(tmp_path / "b"), "--text-field", "body"]
    for args in (old, new):
        code, _, err = run([*args, "--progress", "false"], capsys)
        assert code == 0, err
    a, b = (json.loads((tmp_path / d / "stats.json").read_text()) for d in "ab")
    assert a["documents"] == b["documents"] == 6


# --- one overwrite rule -----------------------------------------------------------------------------------


def refused(code: int, err: str, out: Path) -> bool:
    return code == 2 and str(out) in err and "--overwrite" in err and "Traceback" not in err


def test_tokenizer_train_refuses_a_non_empty_out(tiny_corpus: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "tok"
    args = ["tokenizer", "train", "--data", str(tiny_corpus), "--out", str(out), "--vocab-size", "280"]
    assert run(args, capsys)[0] == 0
    before = (out / "tokenizer.json").read_bytes()
    code, _, err = run([*args[:-1], "300"], capsys)
    assert refused(code, err, out) and (out / "tokenizer.json").read_bytes() == before
    assert run([*args[:-1], "300", "--overwrite"], capsys)[0] == 0
    assert (out / "tokenizer.json").read_bytes() != before


def test_annotate_and_merge_labels_refuse_an_existing_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    src = tmp_path / "u.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["great film", "awful plot", "a film"]))
    rules = tmp_path / "rules.yaml"
    rules.write_text("labels:\n  pos: {keywords: [great]}\n  neg: {keywords: [awful]}\n")
    pre = tmp_path / "pre.jsonl"
    args = ["data", "annotate", "--data", str(src), "--model", str(rules), "--out", str(pre)]
    assert run(args, capsys)[0] == 0
    code, _, err = run(args, capsys)
    assert refused(code, err, pre)
    assert run([*args, "--overwrite"], capsys)[0] == 0

    merged = tmp_path / "merged.jsonl"
    merged.write_text("keep me\n")
    review = pre.with_suffix(".review.csv")
    args = ["data", "merge-labels", str(pre), str(review), "--out", str(merged)]
    code, _, err = run(args, capsys)
    assert refused(code, err, merged) and merged.read_text() == "keep me\n"
    assert run([*args, "--overwrite"], capsys)[0] == 0
    assert merged.read_text() != "keep me\n"


def test_stats_predict_and_eval_refuse_an_existing_out_before_any_work(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The refusal comes first: no model is loaded (none exists here) and nothing is written."""
    report = tmp_path / "report"
    report.mkdir()
    (report / "stats.json").write_text("{}")
    existing = tmp_path / "existing.json"
    existing.write_text("{}")
    for args, out in [(["data", "stats", str(tmp_path), "--out", str(report)], report),
                      (["predict", "--model", "nowhere", "--data", "x.csv", "--out", str(existing)], existing),
                      (["eval", "--model", "nowhere", "--task", "perplexity", "--data", "x", "--out", str(existing)],
                       existing)]:
        code, _, err = run(args, capsys)
        assert refused(code, err, out), err
    assert existing.read_text() == "{}"


def test_a_failed_clean_can_be_retried(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A clean that stopped on a bad line leaves its work folder; the same command then says exactly how to go
    on (--resume true with the same settings, or --overwrite), and both ways work once the line is fixed."""
    data = tmp_path / "in.jsonl"
    good = json.dumps({"text": "A sentence long enough to keep, with several words in it for the filters."})
    data.write_text(good + "\n{broken\n")
    out = tmp_path / "clean"
    args = ["data", "clean", str(data), str(out), "--progress", "false"]
    code, _, err = run(args, capsys)
    assert code == 2 and "in.jsonl:2" in err
    code, _, err = run(args, capsys)
    assert code == 2 and "--resume true" in err and "--overwrite" in err, err
    data.write_text(good + "\n")
    code, _, err = run([*args, "--resume", "true"], capsys)
    assert code == 0, err
    assert (out / "manifest.json").exists()
    code, _, err = run(args, capsys)  # finished: refused, naming --overwrite
    assert refused(code, err, out)
    assert run([*args, "--overwrite"], capsys)[0] == 0


def test_clean_with_other_settings_says_how_to_start_over(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    data = tmp_path / "in.jsonl"
    data.write_text(json.dumps({"text": "words " * 20}) + "\n{broken\n")
    out = tmp_path / "clean"
    run(["data", "clean", str(data), str(out), "--progress", "false"], capsys)
    code, _, err = run(["data", "clean", str(data), str(out), "--pii", "false", "--progress", "false"], capsys)
    assert code == 2 and "other inputs or settings" in err and "--overwrite" in err


# --- errors in plain words --------------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "line"), [
    (["pretrain", "--data", "p", "--precision", "16"],
     "error: --precision accepts one of: bf16-mixed, 32; got '16'"),
    (["pretrain", "--data", "p", "--max-steps", "two"], "error: --max-steps accepts a whole number; got 'two'"),
    (["pretrain", "--data", "p", "--init", "kaiming"],
     "error: --init accepts one of: normal, xavier, he; got 'kaiming'"),
])
def test_a_bad_value_is_one_line_naming_option_choices_and_value(
        args: list[str], line: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(args, capsys)
    assert code == 2 and out == ""
    assert err.strip() == line, err


@pytest.fixture(scope="module")
def encoder_checkpoint(tiny_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lmforge.tokenizer import Tokenizer

    config = EncoderConfig(vocab_size=Tokenizer.load(tiny_tokenizer_dir).vocab_size, hidden_size=32,
                           num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                           max_position_embeddings=64)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("encoder") / "bert"
    save_checkpoint(out, Encoder(config), config, tokenizer_dir=tiny_tokenizer_dir)
    return out


@pytest.mark.parametrize("args", [
    ["generate", "--prompt", "hello"], ["chat"], ["serve", "--port", "1"], ["eval", "perplexity", "--data", "x"]])
def test_an_encoder_checkpoint_is_refused_in_words(encoder_checkpoint: Path, args: list[str],
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run([*args, "--model", str(encoder_checkpoint)], capsys)
    assert code == 2 and "Traceback" not in err
    assert "encoder (BERT-style) model cannot" in err and str(encoder_checkpoint) in err


def test_an_unterminated_csv_quote_is_called_that(tmp_path: Path) -> None:
    from lmforge.data.readers import iter_texts

    path = tmp_path / "t.csv"
    path.write_text('text,label\n"fine",a\n"never closed,b\nmore,c\n')
    with pytest.raises(DataError, match=r"t\.csv:3: .*quote.*never closed"):
        list(iter_texts(path))


def test_validate_checks_a_csv_as_csv(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "labels.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([["text", "label"], ["good film", "pos"], ["bad film", "neg"], ["no label", ""]])
    code, _, err = run(["data", "validate", str(path)], capsys)
    assert code == 2 and "JSON" not in err
    assert f"{path}:4: field 'label' missing" in err
    assert "1 of 3 lines" in err


def test_validate_names_the_column_of_a_json_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "labels.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n{"text": "bad", "label": }\n')
    code, _, err = run(["data", "validate", str(path)], capsys)
    column = '{"text": "bad", "label": }'.index("}") + 1
    assert code == 2 and f"{path}:2: invalid JSON (Expecting value at column {column})" in err, err


def test_merge_lora_names_base_and_says_what_it_wrote(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    adapter = tmp_path / "lora"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model": str(tmp_path / "gone")}))
    code, _, err = run(["merge-lora", str(adapter), "--out", str(tmp_path / "m")], capsys)
    assert code == 2 and "--base" in err and "--model" not in err and "gone" in err
    code, _, err = run(["merge-lora", str(adapter), "--base", str(tmp_path / "nope"), "--out", str(tmp_path / "m")],
                       capsys)
    assert code == 2 and "--base" in err and "nope" in err


def test_merge_lora_reports_the_out_directory(tmp_path: Path, make_checkpoint, capsys) -> None:
    base = make_checkpoint("gpt2-tiny", out=tmp_path / "base")
    corpus = tmp_path / "sft.jsonl"
    corpus.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"hi {i}"},
                                                       {"role": "assistant", "content": f"hello {i}"}]}) + "\n"
                              for i in range(8)))
    run_dir = lmforge.finetune_lora(base, corpus, tmp_path / "run", max_steps=1, batch_size=2, block_size=32,
                                    precision="32", progress=False)
    capsys.readouterr()
    code, _, err = run(["merge-lora", str(run_dir), "--out", str(tmp_path / "merged")], capsys)
    assert code == 0, err
    assert f"wrote {tmp_path / 'merged'}" in err and f"into {base}" not in err


# Message templates: an f-string glued to a plain string leaves `{name}` unfilled; a doubled word reads as a typo.
_PLACEHOLDER = re.compile(r"\{[A-Za-z_][A-Za-z0-9_.]*(\[[^\]]*\])?(![rsa])?(:[^}\s]*)?\}")
_DOUBLED = re.compile(r"\b(at|the|a|to|of|in|is|and)\s+\1\b")


def test_no_message_has_an_unfilled_placeholder_or_a_doubled_word() -> None:
    found = []
    for path in LMFORGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.JoinedStr):
                text = "".join(v.value if isinstance(v, ast.Constant) else " X " for v in node.values)
                plain = [v.value for v in node.values if isinstance(v, ast.Constant)]
                if any(_PLACEHOLDER.search(p) for p in plain) or _DOUBLED.search(text):
                    found.append(f"{path.relative_to(LMFORGE)}:{node.lineno}")
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and _DOUBLED.search(node.value):
                found.append(f"{path.relative_to(LMFORGE)}:{node.lineno}")
    assert not found, found


def test_warnings_print_as_one_plain_line(capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A library's warning reaches the user as `warning: ...`, without a file path, line number or class name."""

    class Warns:
        is_seq2seq = True

        def require_decoder(self, verb: str) -> None:
            pass

        def generate(self, prompt: str, **sampling: object) -> str:
            warnings.warn("the prompt was trimmed", UserWarning, stacklevel=1)
            return "ok"

    monkeypatch.setattr(lmforge.infer.generate, "load", lambda *args, **kwargs: Warns())
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        code, out, err = run(["generate", "--model", "m", "--prompt", "p"], capsys)
    assert code == 0 and out.strip() == "ok"
    assert err.strip() == "warning: the prompt was trimmed", err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["--version"], capsys)
    assert code == 0 and out.strip() == f"lmforge {lmforge.__version__}"


# --- generate follows the server's context rule -----------------------------------------------------------


def test_generate_refuses_max_new_tokens_beyond_the_context(make_checkpoint, tmp_path: Path) -> None:
    """prompt + max_new_tokens must fit the context, as the server rules: an error with both counts and what
    would fit, not a prompt silently cut from the left; unset, the default is cut to what fits."""
    from lmforge.infer.generate import fit_budget
    from lmforge.lm import load

    ckpt = make_checkpoint("gpt2-tiny", out=tmp_path / "ckpt", max_position_embeddings=32)
    lm = load(ckpt, device="cpu")
    prompt = "the cat sat on the mat"
    length = len(lm.tokenizer.encode(prompt))
    with pytest.raises(ConfigError, match=rf"maximum context length is 32 tokens; the prompt has {length} and "
                                          rf"--max-new-tokens asks for 40 more: ask for at most {32 - length}"):
        lmforge.generate(ckpt, prompt, max_new_tokens=40, device="cpu")
    assert fit_budget(lm, prompt, 32 - length) == 32 - length
    assert fit_budget(lm, prompt, None) == min(8, 32 - length)  # the checkpoint's generation_config: 8
    with pytest.raises(ConfigError, match="the prompt has"):
        fit_budget(lm, "word " * 200, None)
