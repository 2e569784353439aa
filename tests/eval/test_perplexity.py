"""Perplexity and bits per byte: equal to a direct computation, every target scored once, packed data's val split."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmforge.data.pack import PackedDataset
from lmforge.errors import ConfigError, DataError
from lmforge.eval.perplexity import perplexity
from lmforge.lm import LM

BLOCK = 32
SHORT = ["The cat sat on the mat.", "naïve café 你好 🙂"]


@pytest.fixture(scope="module")
def lm(make_lm: Callable[..., LM]) -> LM:
    """A random gpt2-style model with a 32-token context, large enough weights that NLL varies by token."""
    return make_lm("gpt2-tiny", hidden_size=64, max_position_embeddings=BLOCK)


@pytest.fixture(scope="module")
def long_docs(tiny_docs: list[str]) -> list[str]:
    return tiny_docs[:4]


def write_docs(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    return path


def stream(lm: LM, docs: list[str]) -> tuple[list[int], list[bool]]:
    """[eos, doc₁, eos, doc₂, eos, …] and whether each position is a target to score (not an eos)."""
    ids, score = [lm.tokenizer.eos_id], [False]
    for doc in docs:
        doc_ids = lm.tokenizer.encode(doc)
        ids += [*doc_ids, lm.tokenizer.eos_id]
        score += [True] * len(doc_ids) + [False]
    return ids, score


@torch.no_grad()
def logp_of_next(lm: LM, context: list[int]) -> torch.Tensor:
    """log p(· | context[:i+1]) for every i, from one plain forward pass."""
    return F.log_softmax(lm.model(torch.tensor([context])).double(), dim=-1)[0]


def test_one_window_equals_exp_mean_nll_of_a_direct_forward(lm: LM, tmp_path: Path) -> None:
    """Text that fits one window: perplexity = exp(mean NLL) of one forward pass, for any stride."""
    ids, score = stream(lm, SHORT)
    assert len(ids) - 1 <= BLOCK
    logp = logp_of_next(lm, ids[:-1])
    nll = [-logp[j - 1, ids[j]].item() for j in range(1, len(ids)) if score[j]]
    data = write_docs(tmp_path / "short.jsonl", SHORT)
    for stride in (1, 7, BLOCK):
        result = perplexity(lm, data, stride=stride, progress=False)
        assert result["tokens"] == len(nll) == sum(len(lm.tokenizer.encode(d)) for d in SHORT)
        assert result["nll"] == pytest.approx(sum(nll) / len(nll), rel=1e-5)
        assert result["perplexity"] == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-5)


def test_stride_equal_to_block_scores_disjoint_chunks(lm: LM, long_docs: list[str], tmp_path: Path) -> None:
    """Longer than the context with stride == block: the NLL of consecutive non-overlapping 32-token chunks."""
    ids, score = stream(lm, long_docs)
    assert len(ids) > 4 * BLOCK
    total, count = 0.0, 0
    for begin in range(0, len(ids) - 1, BLOCK):
        end = min(begin + BLOCK, len(ids) - 1)
        logp = logp_of_next(lm, ids[begin:end])
        for j in range(begin + 1, end + 1):
            if score[j]:
                total -= logp[j - 1 - begin, ids[j]].item()
                count += 1
    result = perplexity(lm, write_docs(tmp_path / "long.jsonl", long_docs), stride=BLOCK, progress=False)
    assert result["tokens"] == count
    assert result["nll"] == pytest.approx(total / count, rel=1e-5)


@pytest.mark.parametrize("stride", [8, 16, 31])
def test_smaller_stride_scores_each_target_from_the_first_window_reaching_it(
        lm: LM, long_docs: list[str], tmp_path: Path, stride: int) -> None:
    """Target j is predicted from tokens [k·stride, j), k the first window reaching it: > block−stride context."""
    ids, score = stream(lm, long_docs)
    targets_by_begin: dict[int, list[int]] = {}
    for j in range(1, len(ids)):
        if score[j]:
            begin = max(0, math.ceil((j - BLOCK) / stride)) * stride
            assert begin == 0 or j - begin > BLOCK - stride
            targets_by_begin.setdefault(begin, []).append(j)
    total, count = 0.0, 0
    for begin, targets in targets_by_begin.items():  # causal: one pass up to the last target serves them all
        logp = logp_of_next(lm, ids[begin:max(targets)])
        total -= sum(logp[j - 1 - begin, ids[j]].item() for j in targets)
        count += len(targets)
    result = perplexity(lm, write_docs(tmp_path / "long.jsonl", long_docs), stride=stride, progress=False)
    assert result["tokens"] == count
    assert result["nll"] == pytest.approx(total / count, rel=1e-5)


@pytest.mark.parametrize("stride", [1, 3, 16, BLOCK])
def test_every_document_token_is_scored_exactly_once(
        lm: LM, long_docs: list[str], tmp_path: Path, stride: int) -> None:
    """Whatever the stride, the number of scored tokens is the number of document tokens (no separators)."""
    result = perplexity(lm, write_docs(tmp_path / "long.jsonl", long_docs), stride=stride, progress=False)
    assert result["tokens"] == sum(len(lm.tokenizer.encode(d)) for d in long_docs)
    assert (result["block_size"], result["stride"]) == (BLOCK, stride)


def test_bits_per_byte_is_total_nll_over_ln2_times_utf8_bytes(lm: LM, tmp_path: Path) -> None:
    """bits/byte = Σ NLL / (ln 2 · UTF-8 bytes of the documents), counting é, 你 and 🙂 as 2, 3 and 4 bytes."""
    ids, score = stream(lm, SHORT)
    logp = logp_of_next(lm, ids[:-1])
    nll_sum = sum(-logp[j - 1, ids[j]].item() for j in range(1, len(ids)) if score[j])
    n_bytes = sum(len(d.encode("utf-8")) for d in SHORT)
    assert n_bytes > sum(len(d) for d in SHORT)
    result = perplexity(lm, write_docs(tmp_path / "short.jsonl", SHORT), progress=False)
    assert result["bytes"] == n_bytes
    assert result["bits_per_byte"] == pytest.approx(nll_sum / (math.log(2) * n_bytes), rel=1e-5)


@pytest.mark.parametrize(("name", "content"), [("empty.txt", ""), ("blank.jsonl", '{"text": ""}\n\n')])
def test_no_text_to_score_is_a_data_error(lm: LM, tmp_path: Path, name: str, content: str) -> None:
    """A file with no non-empty document raises DataError naming it."""
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=name):
        perplexity(lm, tmp_path / name, progress=False)


def test_csv_and_parquet_score_exactly_as_the_same_jsonl(lm: LM, long_docs: list[str], tmp_path: Path) -> None:
    """The shared reader gives eval the CSV's text column (no header, no quotes) and reads Parquet."""
    import csv

    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = [*long_docs, 'a "quoted", comma-laden line']
    with open(tmp_path / "docs.csv", "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows([["id", "text"], *([i, d] for i, d in enumerate(docs))])
    pq.write_table(pa.table({"text": docs}), tmp_path / "docs.parquet")
    expected = perplexity(lm, write_docs(tmp_path / "docs.jsonl", docs), stride=BLOCK // 2, progress=False)
    for name in ("docs.csv", "docs.parquet"):
        assert perplexity(lm, tmp_path / name, stride=BLOCK // 2, progress=False) == expected, name


def test_packed_dataset_is_scored_on_its_val_split(
        lm: LM, tiny_packed: Path, tmp_path: Path) -> None:
    """A `data pack` directory gives exactly the result of its val split's documents as a text corpus."""
    val = PackedDataset(tiny_packed, "val").window(0, PackedDataset(tiny_packed, "val").num_tokens)
    ends = np.flatnonzero(val == lm.tokenizer.eos_id)
    docs = [lm.tokenizer.decode(val[s:e].tolist()) for s, e in zip([0, *(ends[:-1] + 1)], ends)]
    assert len(docs) > 1
    packed = perplexity(lm, tiny_packed, stride=BLOCK, progress=False)
    as_text = perplexity(lm, write_docs(tmp_path / "val.jsonl", docs), stride=BLOCK, progress=False)
    assert packed["tokens"] == len(val) - len(ends) < PackedDataset(tiny_packed, "train").num_tokens
    assert packed["bytes"] == as_text["bytes"] == sum(len(d.encode("utf-8")) for d in docs)
    assert packed["nll"] == pytest.approx(as_text["nll"], rel=1e-6)


def test_bad_stride_or_block_size_is_a_config_error(make_checkpoint, tmp_path):
    """A zero or oversize window is refused by name instead of silently replaced by a default."""
    text = tmp_path / "t.txt"
    text.write_text("some text to score " * 20)
    ckpt = make_checkpoint("gpt2-tiny")
    for kwargs, name in (({"stride": 0}, "stride"), ({"block_size": 0}, "block_size"),
                         ({"block_size": 10_000}, "block_size"), ({"block_size": 16, "stride": 17}, "stride")):
        with pytest.raises(ConfigError, match=name):
            perplexity(ckpt, text, progress=False, **kwargs)
