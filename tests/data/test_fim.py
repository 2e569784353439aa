"""Fill-in-the-middle packing: the transform loses nothing, honours its rates, and uses the tokenizer's sentinels."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from lmforge.data.fim import FimConfig, Sentinels, arrange, is_code_corpus, restore, spans, transform
from lmforge.data.pack import PackedDataset, pack
from lmforge.errors import ConfigError
from lmforge.tokenizer import FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX, Tokenizer, train_tokenizer

CODE = '''import os


def read(path):
    """Return the text of a file."""
    with open(path, encoding="utf-8") as f:
        return f.read()


class Stack:
    def __init__(self):
        self.items = []

    def push(self, item):
        self.items.append(item)

    def pop(self):
        return self.items.pop()
'''


def documents(n: int = 60) -> list[str]:
    return [CODE.replace("Stack", f"Stack{i}").replace("items", f"items_{i % 7}") + f"# ünïcode {i} 🙂\n"
            for i in range(n)]


@pytest.fixture(scope="module")
def code_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("code")
    for i, doc in enumerate(documents()):
        (root / f"m{i}.py").write_text(doc, encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def tok_dir(code_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tokenizer(code_dir, tmp_path_factory.mktemp("tok"), vocab_size=400)


@pytest.fixture(scope="module")
def tok(tok_dir: Path) -> Tokenizer:
    return Tokenizer.load(tok_dir)


def sentinels(tok: Tokenizer) -> Sentinels:
    assert tok.fim is not None
    return Sentinels(tok.fim.prefix, tok.fim.suffix, tok.fim.middle, tok.eos_id)


def test_a_code_corpus_gets_fim_tokens_as_ids_5_to_7(tok: Tokenizer, tmp_path: Path) -> None:
    """A tokenizer trained on source files reserves the three sentinels; one trained on prose does not."""
    assert tok.fim is not None
    assert (tok.fim.prefix, tok.fim.suffix, tok.fim.middle) == (5, 6, 7)
    assert tok.fim.names == (FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE)
    assert tok.decode([5, 6, 7], skip_special_tokens=True) == ""  # special: never shown in generated text
    (tmp_path / "prose.txt").write_text("The cat sat on the mat. " * 50, encoding="utf-8")
    prose = Tokenizer.load(train_tokenizer(tmp_path / "prose.txt", tmp_path / "ptok", vocab_size=300))
    assert prose.fim is None
    forced = Tokenizer.load(train_tokenizer(tmp_path / "prose.txt", tmp_path / "ftok", vocab_size=300, fim=True))
    assert forced.fim is not None and forced.fim.prefix == 5


@pytest.mark.parametrize("names", [
    ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),  # StarCoder
    ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),  # Qwen2.5-Coder
    ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"),  # DeepSeek-Coder
])
def test_imported_tokenizers_keep_their_own_fim_tokens(names: tuple[str, str, str]) -> None:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    hf = HFTokenizer(models.BPE())
    hf.add_special_tokens(["<|endoftext|>", *names, "<file_sep>"])
    tok = Tokenizer(hf, {"eos_token": "<|endoftext|>"})
    assert tok.fim is not None
    assert tok.fim.names == names
    assert [tok.fim.prefix, tok.fim.suffix, tok.fim.middle] == [hf.token_to_id(n) for n in names]
    assert tok.fim.stop_names == ("<file_sep>",)


def test_psm_and_spm_round_trip_to_the_original_text(tok: Tokenizer) -> None:
    """Every document, cut into spans and rearranged in either order, restores to exactly its text."""
    s = sentinels(tok)
    for spm_rate in (0.0, 1.0, 0.5):
        cfg = FimConfig(rate=1.0, spm_rate=spm_rate, span_tokens=32)
        for seed, doc in enumerate(documents(12)):
            ids, n = transform(doc, tok.encode(doc), lambda parts: tok.encode_batch(parts), s, cfg, seed)
            assert n == len(spans(doc, len(tok.encode(doc)), 32)) > 1
            assert ids.count(s.middle) == n and ids.count(s.eos) == n - 1
            assert restore(ids, tok.decode, s) == doc


def test_arrange_orders_match_the_paper() -> None:
    """PSM: <PRE> p <SUF> s <MID> m; SPM (variant 2): <PRE> <SUF> s <MID> p m."""
    s = Sentinels(prefix=-1, suffix=-2, middle=-3, eos=0)
    assert arrange([1], [2], [3], s, spm=False) == [-1, 1, -2, 3, -3, 2]
    assert arrange([1], [2], [3], s, spm=True) == [-1, -2, 3, -3, 1, 2]


def test_rates_are_honoured(tok: Tokenizer) -> None:
    """Over many spans, the share transformed is fim_rate and the share of those in SPM order is spm_rate."""
    s = sentinels(tok)
    cfg = FimConfig(rate=0.3, spm_rate=0.25, span_tokens=24)
    fim = total = spm = 0
    for seed in range(40):
        for doc in documents(10):
            ids, n = transform(doc, tok.encode(doc), lambda parts: tok.encode_batch(parts), s, cfg, seed)
            fim += n
            total += len(spans(doc, len(tok.encode(doc)), 24))
            spm += sum(1 for a, b in itertools.pairwise(ids) if (a, b) == (s.prefix, s.suffix))
    assert abs(fim / total - 0.3) < 0.03
    # a PSM example with an empty prefix also starts <PRE><SUF>: ~1/(span chars) of them, negligible here
    assert abs(spm / fim - 0.25) < 0.05


def test_split_points_are_character_level_and_uniform(tok: Tokenizer) -> None:
    """Middles start anywhere, also inside a token (character-level splits, not token boundaries)."""
    s = sentinels(tok)
    doc = "abcdefghijklmnopqrstuvwxyz" * 2
    starts = set()
    for seed in range(300):
        ids, n = transform(doc, tok.encode(doc), lambda parts: tok.encode_batch(parts), s,
                           FimConfig(rate=1.0, spm_rate=0.0, span_tokens=1000), seed)
        assert n == 1
        prefix = tok.decode(ids[1:ids.index(s.suffix)])
        starts.add(len(prefix))
    assert len(starts) > 40  # of 53 possible positions


def test_pack_applies_fim_to_train_only_by_default_for_code(code_dir: Path, tok_dir: Path, tok: Tokenizer,
                                                             tmp_path: Path) -> None:
    """A folder of .py files packs with FIM at rate 0.5 by default; the val split stays left-to-right; every
    training document restores to a source file."""
    out = pack(code_dir, tok_dir, tmp_path / "packed", workers=1, val_fraction=0.1, fim_span_tokens=40)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["fim"]["rate"] == 0.5 and meta["fim"]["examples"] > 0
    assert meta["fim"]["tokens"] == [FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE]
    s = sentinels(tok)
    originals = set(documents())
    train = PackedDataset(out, "train").window(0, meta["tokens"]["train"]).tolist()
    docs = _split(train, s.eos)
    assert sum(d.count(s.middle) for d in docs) == meta["fim"]["examples"]
    restored = _documents_of(train, tok, s)
    assert restored <= originals and len(restored) == meta["documents"]["train"]
    val = PackedDataset(out, "val").window(0, meta["tokens"]["val"]).tolist()
    assert s.middle not in val and s.prefix not in val


def test_pack_refuses_fim_without_tokens_and_skips_prose(tmp_path: Path) -> None:
    (tmp_path / "prose.txt").write_text("The cat sat on the mat. " * 50, encoding="utf-8")
    tok_dir = train_tokenizer(tmp_path / "prose.txt", tmp_path / "tok", vocab_size=300)
    with pytest.raises(ConfigError, match="no fill-in-the-middle tokens"):
        pack(tmp_path / "prose.txt", tok_dir, tmp_path / "a", workers=1, fim_rate=0.5)
    out = pack(tmp_path / "prose.txt", tok_dir, tmp_path / "b", workers=1)
    assert json.loads((out / "meta.json").read_text())["fim"] is None
    with pytest.raises(ConfigError, match="fim_rate"):
        pack(tmp_path / "prose.txt", tok_dir, tmp_path / "c", workers=1, fim_rate=1.5)


def test_code_corpus_rule(code_dir: Path, tmp_path: Path) -> None:
    """Code: mostly source files, or a `data clean --preset code` folder; a JSONL or text folder is not."""
    assert is_code_corpus(code_dir) and is_code_corpus(code_dir / "m0.py")
    (tmp_path / "notes.txt").write_text("hello")
    assert not is_code_corpus(tmp_path / "notes.txt")
    cleaned = tmp_path / "clean"
    cleaned.mkdir()
    (cleaned / "part-00000.jsonl").write_text('{"text": "x = 1"}\n')
    (cleaned / "manifest.json").write_text(json.dumps({"settings": {"preset": "prose"}}))
    assert not is_code_corpus(cleaned)
    (cleaned / "manifest.json").write_text(json.dumps({"settings": {"preset": "code"}}))
    assert is_code_corpus(cleaned)


def _split(ids: list[int], eos: int) -> list[list[int]]:
    out, cur = [], []
    for t in ids:
        if t == eos:
            out.append(cur)
            cur = []
        else:
            cur.append(t)
    return out


def _documents_of(stream: list[int], tok: Tokenizer, s: Sentinels) -> set[str]:
    """Packed documents back to text: a FIM span ends in eos like a document, so join segments until one
    restores to a known document (greedy), as `restore` joins them."""
    originals = set(documents())
    found, pending = set(), []
    for segment in _split(stream, s.eos):
        pending.append(segment)
        joined = [t for i, seg in enumerate(pending) for t in ([s.eos] if i else []) + seg]
        text = restore(joined, tok.decode, s)
        if text in originals:
            found.add(text)
            pending = []
    assert not pending
    return found


def test_spans_join_back_and_end_at_lines() -> None:
    text = "".join(f"line {i}\n" for i in range(100))
    pieces = spans(text, n_tokens=300, span_tokens=30)
    assert "".join(pieces) == text and len(pieces) > 5
    assert all(p.endswith("\n") for p in pieces)
    assert np.mean([len(p) for p in pieces]) <= len(text) * 30 / 300
