"""`lmforge translate` / `lmforge.translate` / `LM.translate` and the completions endpoint on an encoder-decoder."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest
import torch
from conftest import running_server

import lmforge
from lmforge.checkpoint import save_checkpoint
from lmforge.cli import main
from lmforge.errors import ConfigError
from lmforge.infer.server import create_app
from lmforge.lm import load
from lmforge.model.seq2seq import Seq2Seq, seq2seq_preset
from lmforge.tokenizer import Tokenizer

LINES = ["the quick brown fox", "", "jumps over the lazy dog", "hello world"]


@pytest.fixture(scope="module")
def mt_checkpoint(tmp_path_factory, tiny_tokenizer_dir: Path) -> Path:
    """A random tiny encoder-decoder with the tiny tokenizer (weights N(0, 0.3): outputs differ by source)."""
    tok = Tokenizer.load(tiny_tokenizer_dir)
    torch.manual_seed(0)
    model = Seq2Seq(seq2seq_preset("seq2seq-tiny", vocab_size=tok.vocab_size, pad_id=tok.pad_id, eos_id=tok.eos_id,
                                   decoder_start_id=tok.bos_id, dropout=0.0))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3)
    out = tmp_path_factory.mktemp("mt")
    generation = {"max_new_tokens": 8, "num_beams": 1, "temperature": 0.0, "eos_token_id": tok.eos_id}
    save_checkpoint(out, model.eval(), model.config, tokenizer_dir=tiny_tokenizer_dir, generation_config=generation)
    return out


@torch.no_grad()
def reference_greedy(lm, text: str, max_new: int) -> str:
    """Greedy decoding without a cache or batching: the full decoder forward for every new token."""
    model, tok = lm.model, lm.tokenizer
    src = torch.tensor([tok.encode(text, add_bos=False)])
    tgt = [model.config.decoder_start_id]
    for _ in range(max_new):
        token = int(model(src, None, torch.tensor([tgt]))[0, -1].argmax())
        if token in tok.stop_ids | {model.config.eos_id}:
            break
        tgt.append(token)
    return tok.decode(tgt[1:], skip_special_tokens=True).strip()


def test_greedy_equals_the_uncached_reference(mt_checkpoint: Path) -> None:
    lm = load(mt_checkpoint, device="cpu")
    outputs = lm.translate([t for t in LINES if t], num_beams=1)  # batched, cached, rows leaving as they end
    expected = [reference_greedy(lm, t, 8) for t in LINES if t]
    assert outputs == expected
    assert len(set(expected)) > 1 and all(expected)  # real, varied outputs
    assert lm.translate(LINES[0]) == expected[0]  # one text in, one text out


def test_cli_translates_a_file_line_by_line(mt_checkpoint: Path, tmp_path: Path) -> None:
    source, out = tmp_path / "in.en", tmp_path / "out.es"
    source.write_text("\n".join(LINES) + "\n")
    assert main(["translate", "--model", str(mt_checkpoint), "--input", str(source), "--num-beams", "3",
                 "--out", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert len(lines) == len(LINES) and lines[1] == ""  # blank lines stay blank, alignment kept
    lm = load(mt_checkpoint, device="cpu")
    assert lines[0] == lm.translate(LINES[0], num_beams=3)
    assert lines[3] == lm.translate(LINES[3], num_beams=3)
    # the one overwrite rule: a second run refuses to replace the translations unless told to
    again = ["translate", "--model", str(mt_checkpoint), "--input", str(source), "--out", str(out)]
    assert main(again) != 0 and out.read_text().splitlines() == lines
    assert main([*again, "--overwrite"]) == 0


def test_cli_translates_a_text_argument(mt_checkpoint: Path, capsys) -> None:
    assert main(["translate", "--model", str(mt_checkpoint), "--input", LINES[3], "--num-beams", "2"]) == 0
    expected = load(mt_checkpoint, device="cpu").translate(LINES[3], num_beams=2)
    assert expected and capsys.readouterr().out.strip() == expected
    # --data, the input option's name in every other verb, is the same option here
    assert main(["translate", "--model", str(mt_checkpoint), "--data", LINES[3], "--num-beams", "2"]) == 0
    assert capsys.readouterr().out.strip() == expected


def test_n_best_and_python_api(mt_checkpoint: Path) -> None:
    lm = load(mt_checkpoint, device="cpu")
    n_best = lm.translate(LINES[0], num_beams=4, num_return_sequences=3)
    assert len(n_best) == 3 and n_best[0] == lm.translate(LINES[0], num_beams=4)
    text = lmforge.translate(str(mt_checkpoint), LINES[0], num_beams=4, num_return_sequences=2, progress=False)
    assert text.splitlines() == [f"0 ||| {n_best[0]}", f"0 ||| {n_best[1]}"]
    assert lmforge.translate(lm, LINES[3], progress=False) == lm.translate(LINES[3])  # a loaded LM works too
    assert lm.generate(LINES[3]) == lm.translate(LINES[3])  # generate on a seq2seq model: prompt = source


def test_bad_inputs_are_refused_in_words(mt_checkpoint: Path, tmp_path: Path, capsys) -> None:
    """More n-best than beams, a mistyped file name and a folder are errors, never a silent short list or
    the file name translated as if it were text."""
    lm = load(mt_checkpoint, device="cpu")
    with pytest.raises(ConfigError, match="at most num_beams=2"):
        lm.translate(LINES[0], num_beams=2, num_return_sequences=3)
    assert main(["translate", "--model", str(mt_checkpoint), "--input", LINES[0], "--num-return-sequences", "3"]) == 2
    assert "num_return_sequences=3" in capsys.readouterr().err
    for missing in (str(tmp_path / "missing.en"), "held_out.en"):
        assert main(["translate", "--model", str(mt_checkpoint), "--input", missing]) == 2
        assert f"--input {missing}: no such file" in capsys.readouterr().err
    assert main(["translate", "--model", str(mt_checkpoint), "--input", str(tmp_path)]) == 2
    assert "a folder" in capsys.readouterr().err
    assert lm.translate("In the beginning.") == lmforge.translate(lm, "In the beginning.", progress=False)
    code = tmp_path / "app.py"
    code.write_text("def f(x):\n    return x\n")
    assert main(["code", "check", "--model", str(mt_checkpoint), str(code)]) == 2
    assert "an encoder-decoder" in capsys.readouterr().err


def test_a_decoder_cannot_translate(make_checkpoint) -> None:
    with pytest.raises(ConfigError, match="encoder-decoder"):
        load(make_checkpoint("gpt2-tiny"), device="cpu").translate("hello")


def test_openai_completions_endpoint_serves_a_seq2seq_model(mt_checkpoint: Path) -> None:
    lm = load(mt_checkpoint, device="cpu")
    with running_server(create_app(lm, name="mt")) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused")
        reply = client.completions.create(model="mt", prompt=LINES[0], max_tokens=6)
        assert reply.choices[0].text == lm.translate(LINES[0], max_new_tokens=6)  # the checkpoint's greedy default
        batch = client.completions.create(model="mt", prompt=[LINES[0], LINES[3]], extra_body={"num_beams": 3})
        assert [c.text for c in batch.choices] == lm.translate([LINES[0], LINES[3]], num_beams=3)
        assert reply.usage.prompt_tokens == len(lm.tokenizer.encode(LINES[0], add_bos=False))
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="other", prompt="x")


def test_a_source_longer_than_the_model_is_cut_with_a_note(mt_checkpoint: Path, capsys) -> None:
    lm = load(mt_checkpoint)
    room = lm.model.config.max_positions
    long = " ".join(["word"] * (4 * room))
    assert len(lm.tokenizer.encode(long, add_bos=False)) > room
    assert lm.translate(long, max_new_tokens=2) == lm.translate(long + " more words", max_new_tokens=2)
    assert f"1 of 1 source(s) longer than the model's {room} tokens were cut" in capsys.readouterr().err
    lm.translate("short", max_new_tokens=2)
    assert "were cut" not in capsys.readouterr().err
