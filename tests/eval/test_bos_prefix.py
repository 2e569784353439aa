"""`eval --bos-prefix eos|none|model`: what precedes a context when a continuation is scored, token by token,
the report stating the convention, and (where lm-evaluation-harness is installed) `none` giving its numbers."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import lmforge
from lmforge.cli import main
from lmforge.errors import ConfigError
from lmforge.eval.harness import encode_pair, run_task
from lmforge.eval.tasks import load_task
from lmforge.lm import LM

CONTEXT = 64
ROWS = [{"q": "The cat sat on the", "choices": ["mat", "dog", "window"], "gold": 0},
        {"q": "A model learns to predict the next", "choices": ["word", "cat", "batch"], "gold": 0},
        {"q": "def add(a, b): return a +", "choices": ["b", "a", "none"], "gold": 0},
        {"q": "naïve café", "choices": ["你好", "🙂", "the"], "gold": 1}]


@pytest.fixture(scope="module")
def lm(make_lm: Callable[..., LM]) -> LM:
    return make_lm("gpt2-tiny", hidden_size=64, max_position_embeddings=CONTEXT)


@pytest.fixture(scope="module")
def bos_lm(lm: LM) -> LM:
    """The same model with a tokenizer whose own rule adds BOS (as Llama's does)."""
    tokenizer = copy.copy(lm.tokenizer)
    tokenizer.add_bos = True
    return LM(lm.model, tokenizer, lm.generation_config)


@pytest.fixture(scope="module")
def task_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mc")
    (root / "data.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS))
    (root / "mc.yaml").write_text("name: mc\nkind: multiple_choice\ndata: data.jsonl\nprompt: '{{q}}'\n"
                                  "choices: choices\nanswer: gold\nmetrics: [acc, acc_norm]\n")
    return root / "mc.yaml"


def test_each_prefix_puts_the_specified_tokens_before_the_context(lm: LM, bos_lm: LM) -> None:
    tok = lm.tokenizer
    assert tok.add_bos is False and tok.bos_id not in (None, tok.eos_id)
    text = tok.encode("The cat sat on the")
    cont_ids = tok.encode("The cat sat on the mat")[len(text):]
    assert encode_pair(lm, "The cat sat on the", " mat", "eos") == ([tok.eos_id, *text], cont_ids)
    assert encode_pair(lm, "The cat sat on the", " mat", "none") == (text, cont_ids)
    assert encode_pair(lm, "The cat sat on the", " mat", "model") == (text, cont_ids)  # this tokenizer adds none
    # a tokenizer that adds BOS: eos mode uses its BOS (not both), model mode too, none neither
    assert encode_pair(bos_lm, "The cat sat on the", " mat", "eos") == ([tok.bos_id, *text], cont_ids)
    assert encode_pair(bos_lm, "The cat sat on the", " mat", "model") == ([tok.bos_id, *text], cont_ids)
    assert encode_pair(bos_lm, "The cat sat on the", " mat", "none") == (text, cont_ids)
    # trailing space moves to the continuation whatever the prefix; an empty context gets end-of-text
    assert encode_pair(lm, "The cat sat on the ", "mat", "none") == (text, cont_ids)
    assert encode_pair(lm, "", "The", "none") == ([tok.eos_id], tok.encode("The"))
    with pytest.raises(ConfigError, match="bos_prefix='bos'"):
        encode_pair(lm, "a", " b", "bos")


@torch.no_grad()
def direct(lm: LM, ids: list[int], n_cont: int) -> float:
    logp = F.log_softmax(lm.model(torch.tensor([ids[:-1]])).double(), dim=-1)[0]
    return sum(logp[p, t].item() for p, t in zip(range(len(ids) - 1 - n_cont, len(ids) - 1), ids[-n_cont:]))


@pytest.mark.parametrize("prefix", ["eos", "none"])
def test_the_prefix_changes_the_scored_context(lm: LM, task_file: Path, prefix: str) -> None:
    """Each choice's loglikelihood is a forward pass over exactly the prefix's tokens + context + choice."""
    result = run_task(lm, load_task(task_file), progress=False, bos_prefix=prefix)
    tok = lm.tokenizer
    for row, detail in zip(ROWS, result["details"]):
        for choice, got in zip(row["choices"], detail["loglikelihoods"]):
            ctx = tok.encode(row["q"])
            cont = tok.encode(row["q"] + " " + choice)[len(ctx):]
            head = [tok.eos_id] if prefix == "eos" else []
            assert got == pytest.approx(direct(lm, [*head, *ctx, *cont], len(cont)), abs=1e-4)
    other = run_task(lm, load_task(task_file), progress=False, bos_prefix="none" if prefix == "eos" else "eos")
    assert other["details"][0]["loglikelihoods"] != result["details"][0]["loglikelihoods"]


def test_the_report_states_the_convention(lm: LM, task_file: Path, tmp_path: Path, make_checkpoint) -> None:
    ckpt = make_checkpoint("gpt2-tiny", out=tmp_path / "ckpt", hidden_size=64, max_position_embeddings=CONTEXT)
    out = tmp_path / "report.json"
    assert main(["eval", "--model", str(ckpt), "--tasks", str(task_file), "--bos-prefix", "none", "--out", str(out),
                 "--progress", "false"]) == 0
    report = json.loads(out.read_text())
    assert report["bos_prefix"] == "none" and "lm-evaluation-harness" in report["scoring_convention"]
    assert "--bos-prefix none" in out.with_suffix(".md").read_text()
    default = lmforge.evaluate(model=ckpt, tasks=task_file, out=tmp_path / "d.json", progress=False)
    assert json.loads((tmp_path / "d.json").read_text())["bos_prefix"] == "eos" and "mc" in default


def test_none_gives_lm_evaluation_harness_numbers(lm: LM, task_file: Path, tmp_path: Path) -> None:
    """lm-evaluation-harness's `hf` model (no BOS by default) on the same HF-converted model: the same
    loglikelihoods, hence the same acc, with `--bos-prefix none`."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from lmforge.convert import to_hf

    hf_dir = to_hf(lm.save(tmp_path / "ckpt"), tmp_path / "hf")
    harness = HFLM(pretrained=str(hf_dir), device="cpu", batch_size=1, dtype="float32")
    requests = [Instance("loglikelihood", {}, (row["q"], " " + c), i)
                for i, row in enumerate(ROWS) for c in row["choices"]]
    theirs = [ll for ll, _ in harness.loglikelihood(requests)]
    ours = [ll for d in run_task(lm, load_task(task_file), progress=False, bos_prefix="none")["details"]
            for ll in d["loglikelihoods"]]
    assert ours == pytest.approx(theirs, abs=1e-4)
    assert not math.isclose(ours[0], run_task(lm, load_task(task_file), progress=False)["details"][0]
                            ["loglikelihoods"][0], abs_tol=1e-6)
