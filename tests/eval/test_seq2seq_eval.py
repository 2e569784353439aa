"""Translation and summarization evaluation: numbers equal sacrebleu's and rouge-score's own, baselines work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from lmforge.cli import main
from lmforge.errors import ConfigError, DataError
from lmforge.eval.evaluate import evaluate
from lmforge.eval.seq2seq import (
    WordDictionary,
    baseline,
    evaluate_pairs,
    lead,
    sentence_lines,
    summarization_scores,
    translation_scores,
)

HYPS = ["the cat sat on the mat.", "a dog barks loudly at night", "hello world"]
REFS = ["the cat sat on a mat.", "the dog barks at night.", "hello there world"]


def test_translation_scores_are_sacrebleus():
    values, signatures = translation_scores(HYPS, REFS)
    assert values["bleu"] == sacrebleu.corpus_bleu(HYPS, [REFS]).score
    assert values["chrf"] == sacrebleu.corpus_chrf(HYPS, [REFS]).score
    assert values["ter"] == sacrebleu.corpus_ter(HYPS, [REFS]).score
    assert "nrefs:1" in signatures["bleu"] and "tok:13a" in signatures["bleu"]
    assert f"version:{sacrebleu.__version__}" in signatures["chrf"]


def test_summarization_scores_are_rouge_scores_with_sentences_on_lines():
    preds = ["The model is small. It trains fast on a CPU.", "Nothing in common here"]
    refs = ["A small model trains fast. It runs on a CPU.", "Totally different words"]
    values, _ = summarization_scores(preds, refs)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeLsum"], use_stemmer=True)
    expected = [scorer.score(r.replace(". ", ".\n"), p.replace(". ", ".\n")) for p, r in zip(preds, refs)]
    for name in ("rouge1", "rouge2", "rougeLsum"):
        assert values[name] == pytest.approx(sum(e[name].fmeasure for e in expected) / 2, abs=1e-12)
    # summary-level LCS: unlike rougeL over the whole text, it matches within sentence pairs
    plain = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(refs[0], preds[0])["rougeL"].fmeasure
    assert values["rougeLsum"] != pytest.approx(plain / 2)


def test_sentence_lines_and_lead():
    assert sentence_lines("One. Two!  Three? four") == "One.\nTwo!\nThree? four" or \
        sentence_lines("One. Two!  Three? four") == "One.\nTwo!\nThree?\nfour"
    assert lead(["First sentence here. Second one.", "def f(x):\n    return x"]) == ["First sentence here.",
                                                                                  "def f(x):"]


def test_word_dictionary_learns_word_for_word():
    en = ["the cat", "the dog", "a cat sleeps", "a dog sleeps", "the red cat", "a red dog"]
    es = ["el gato", "el perro", "un gato duerme", "un perro duerme", "el gato rojo", "un perro rojo"]
    d = WordDictionary.learn(en, es)
    assert d.table["cat"] == "gato" and d.table["dog"] == "perro" and d.table["sleeps"] == "duerme"
    assert d(["The dog sleeps, Juan."]) == ["El perro duerme, Juan."]  # case kept, unknown name copied


@pytest.fixture
def pairs_dir(tmp_path: Path) -> Path:
    train = [("the cat", "el gato"), ("the dog", "el perro"), ("a cat sleeps", "un gato duerme"),
             ("a dog sleeps", "un perro duerme"), ("the dog sleeps", "el perro duerme")] * 3
    test = [("the cat sleeps.", "el gato duerme."), ("a dog.", "un perro.")]
    for name, rows in (("train", train), ("test", test)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"source": s, "target": t}) + "\n" for s, t in rows))
    return tmp_path


def test_copy_baseline_through_evaluate_matches_sacrebleu(pairs_dir, tmp_path):
    summary = evaluate("copy", task="translation", data=pairs_dir / "test.jsonl", out=tmp_path / "r.json",
                       progress=False)
    sources, refs = ["the cat sleeps.", "a dog."], ["el gato duerme.", "un perro."]
    assert summary["translation"]["bleu"] == sacrebleu.corpus_bleu(sources, [refs]).score
    assert summary["translation"]["chrf"] == sacrebleu.corpus_chrf(sources, [refs]).score
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["tasks"]["translation"]["predictor"] == "baseline:copy"
    assert [d["prediction"] for d in report["tasks"]["translation"]["details"]] == sources
    assert "nrefs:1|case:mixed" in (tmp_path / "r.md").read_text()  # the signature is in the table's notes


def test_dictionary_baseline_from_the_cli(pairs_dir, tmp_path, capsys):
    assert main(["eval", "--model", "dictionary", "--task", "translation", "--data", str(pairs_dir / "test.jsonl"),
                 "--out", str(tmp_path / "d.json")]) == 0
    details = json.loads((tmp_path / "d.json").read_text())["tasks"]["translation"]["details"]
    assert [d["prediction"] for d in details] == ["el gato duerme.", "un perro."]
    assert json.loads(capsys.readouterr().out)["translation"]["bleu"] == pytest.approx(100.0)


def test_a_callable_predicts(pairs_dir):
    result = evaluate_pairs(lambda sources: [s.upper() for s in sources], pairs_dir, "summarization", progress=False)
    assert result["details"][0]["prediction"] == "THE CAT SLEEPS." and result["examples"] == 2
    assert result["metrics"]["rouge1"] == summarization_scores(["THE CAT SLEEPS.", "A DOG."],
                                                               ["el gato duerme.", "un perro."])[0]["rouge1"]


def test_bad_requests_are_refused(pairs_dir, tmp_path):
    with pytest.raises(ConfigError, match="--task translation needs --data"):
        evaluate("copy", task="translation", progress=False)
    (tmp_path / "alone").mkdir()
    (tmp_path / "alone" / "test.jsonl").write_text('{"source": "a", "target": "b"}\n')
    with pytest.raises(DataError, match="dictionary baseline learns from the training pairs"):
        baseline("dictionary", tmp_path / "alone" / "test.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"source": "a"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:1: field 'target' missing"):
        evaluate_pairs("copy", tmp_path / "bad.jsonl", "translation", progress=False)


def test_baselines_are_rows_of_the_same_table(pairs_dir, tmp_path):
    summary = evaluate("copy", task="translation", data=pairs_dir / "test.jsonl", baselines="copy,dictionary",
                       out=tmp_path / "r.json", progress=False)
    assert summary["translation[baseline:dictionary]"]["bleu"] == pytest.approx(100.0)
    assert summary["translation[baseline:copy]"] == summary["translation"]
    table = (tmp_path / "r.md").read_text()
    assert "| translation[baseline:dictionary] | translation | bleu | 100" in table
    assert table.count("- translation bleu: nrefs:1") == 1  # one signature note, not one per row
    with pytest.raises(ConfigError, match="--baselines unknown"):
        evaluate("copy", task="translation", data=pairs_dir / "test.jsonl", baselines="unknown", progress=False)


def test_an_encoder_decoder_checkpoint_from_the_cli(pairs_dir, tmp_path, capsys):
    """A (random, tiny) seq2seq run directory evaluates through `lmforge eval`, its outputs those of translate."""
    import torch

    from lmforge.checkpoint import save_checkpoint
    from lmforge.lm import load
    from lmforge.model.seq2seq import Seq2Seq, seq2seq_preset
    from lmforge.tokenizer import Tokenizer, train_tokenizer

    tok_dir = train_tokenizer(pairs_dir, tmp_path / "tok", fields="source,target", vocab_size=280)
    tok = Tokenizer.load(tok_dir)
    start = tok.bos_id if tok.bos_id is not None else tok.pad_id
    config = seq2seq_preset("seq2seq-tiny", vocab_size=tok.vocab_size, pad_id=tok.pad_id, eos_id=tok.eos_id,
                            decoder_start_id=start, max_positions=32)
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "run", Seq2Seq(config).eval(), config, tokenizer_dir=tok_dir,
                    generation_config={"max_new_tokens": 8, "num_beams": 1, "eos_token_id": tok.eos_id,
                                       "pad_token_id": tok.pad_id, "decoder_start_token_id": start})
    assert main(["eval", "--model", str(tmp_path / "run"), "--task", "translation", "--data",
                 str(pairs_dir / "test.jsonl"), "--num-beams", "2", "--max-new-tokens", "6",
                 "--out", str(tmp_path / "m.json")]) == 0
    report = json.loads((tmp_path / "m.json").read_text())["tasks"]["translation"]
    expected = load(tmp_path / "run").translate(["the cat sleeps.", "a dog."], num_beams=2, max_new_tokens=6)
    assert [d["prediction"] for d in report["details"]] == [e.strip() for e in expected]
    assert report["predictor"] == "model" and report["num_beams"] == 2
    assert "translation bleu" in capsys.readouterr().err  # the score is printed with its signature
