"""`lmforge summarize`: an encoder-decoder summarizes as it translates; a decoder-only model is prompted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lmforge
from lmforge.apps.summarize import documents
from lmforge.checkpoint import save_checkpoint
from lmforge.cli import main
from lmforge.errors import DataError
from lmforge.infer.seq2seq import SUMMARY_INSTRUCTION, summary_prompt
from lmforge.lm import LM, load
from lmforge.model.seq2seq import Seq2Seq, seq2seq_preset
from lmforge.tokenizer import Tokenizer

DOCS = ["The cat sat on the mat. It was warm and the sun was out.",
        "Stocks fell sharply on Monday. Analysts blamed rates."]


@pytest.fixture(scope="module")
def sum_checkpoint(tmp_path_factory, tiny_tokenizer_dir: Path) -> Path:
    tok = Tokenizer.load(tiny_tokenizer_dir)
    torch.manual_seed(1)
    model = Seq2Seq(seq2seq_preset("seq2seq-tiny", vocab_size=tok.vocab_size, pad_id=tok.pad_id, eos_id=tok.eos_id,
                                   decoder_start_id=tok.bos_id, dropout=0.0))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3)
    out = tmp_path_factory.mktemp("sum")
    save_checkpoint(out, model.eval(), model.config, tokenizer_dir=tiny_tokenizer_dir,
                    generation_config={"max_new_tokens": 10, "num_beams": 2, "temperature": 0.0})
    return out


def test_seq2seq_summarizes_each_jsonl_row(sum_checkpoint: Path, tmp_path: Path) -> None:
    data, out = tmp_path / "docs.jsonl", tmp_path / "summaries.txt"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    assert main(["summarize", "--model", str(sum_checkpoint), "--input", str(data), "--out", str(out)]) == 0
    lm = load(sum_checkpoint, device="cpu")
    expected = [lm.translate(d, num_beams=2, max_new_tokens=10) for d in DOCS]
    assert out.read_text().splitlines() == expected and all(expected)
    assert lm.summarize(DOCS) == expected


def test_an_empty_row_keeps_its_line(sum_checkpoint: Path, tmp_path: Path) -> None:
    """Output line k is row k's summary: an empty row gets an empty line, not a shift of every later one."""
    data, out = tmp_path / "docs.jsonl", tmp_path / "summaries.txt"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in [DOCS[0], "", DOCS[1]]))
    assert main(["summarize", "--model", str(sum_checkpoint), "--input", str(data), "--out", str(out)]) == 0
    lm = load(sum_checkpoint, device="cpu")
    assert out.read_text().splitlines() == [lm.summarize(DOCS[0]), "", lm.summarize(DOCS[1])]
    data.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DataError, match=r"docs.jsonl:1: no field 'text'"):
        documents(str(data))
    with pytest.raises(DataError, match="no such file"):
        documents(str(tmp_path / "missing.txt"))


def test_a_text_file_is_one_document(tmp_path: Path) -> None:
    path = tmp_path / "article.txt"
    path.write_text("First paragraph.\n\nSecond paragraph.\n")
    assert documents(str(path)) == ["First paragraph.\n\nSecond paragraph.\n"]
    assert documents("not a file, the text itself") == ["not a file, the text itself"]


def test_a_decoder_is_prompted_through_its_chat_template(make_lm) -> None:
    lm: LM = make_lm("gpt2-tiny", generation_config={"max_new_tokens": 6, "temperature": 1.0})
    assert lm.tokenizer.chat_template is not None
    prompt, stop = summary_prompt(lm.tokenizer, DOCS[0])
    assert DOCS[0] in prompt and prompt == lm.tokenizer.apply_chat_template(
        [{"role": "user", "content": SUMMARY_INSTRUCTION.format(text=DOCS[0])}], add_generation_prompt=True)
    summary = lmforge.summarize(lm, DOCS[0], max_new_tokens=6, progress=False)
    # greedy by default (the checkpoint samples at 1.0): the same as generating from that prompt at temperature 0
    assert summary == lm.generate(prompt, stop=stop, max_new_tokens=6, temperature=0.0).strip()


def test_without_a_template_a_plain_prompt(make_lm) -> None:
    lm: LM = make_lm("gpt2-tiny")
    plain = Tokenizer(lm.tokenizer.hf, {k: v for k, v in lm.tokenizer.config.items() if k != "chat_template"})
    prompt, stop = summary_prompt(plain, DOCS[1])
    assert prompt.endswith("Summary:") and DOCS[1] in prompt and stop == ["\n"]
