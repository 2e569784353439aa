"""Agreement with transformers: on a tiny GPT-2 built and saved by transformers and loaded with `lmforge.load`,
the harness's per-example loglikelihoods and multiple-choice accuracy equal what transformers computes directly."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

import lmforge
from lmforge.eval.harness import run_task
from lmforge.eval.tasks import load_task

TASKS = Path(__file__).resolve().parents[2] / "tasks"


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models are dominated by thread synchronisation on a busy CI box; results do not depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    """A random 2-layer GPT-2 with a 512-token context, saved by transformers with our tiny tokenizer."""
    directory = tmp_path_factory.mktemp("hf_gpt2")
    tok = PreTrainedTokenizerFast(tokenizer_file=str(tiny_tokenizer_dir / "tokenizer.json"),
                                  eos_token="<|endoftext|>", pad_token="<|pad|>")
    config = GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4, n_positions=512,
                        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # larger than the init's 0.02 so the choices' loglikelihoods differ clearly
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


@torch.no_grad()
def transformers_loglikelihood(model: GPT2LMHeadModel, tok: PreTrainedTokenizerFast, context: str,
                               continuation: str) -> float:
    """Σ log p(continuation | eos + context) from transformers' own tokenizer and forward pass."""
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    cont = tok(context + continuation, add_special_tokens=False)["input_ids"][len(ctx):]
    ids = torch.tensor([[tok.eos_token_id, *ctx, *cont]])
    logp = F.log_softmax(model(ids[:, :-1]).logits.double(), dim=-1)[0]
    return sum(logp[len(ctx) + i, t].item() for i, t in enumerate(cont))


def test_loglikelihoods_and_multiple_choice_accuracy_match_transformers(hf_dir: Path) -> None:
    """The shipped capitals task (2-shot) and proverbs task: every loglikelihood agrees with transformers to 1e-4
    relative, and so the predicted choices and acc / acc_norm are identical."""
    lm = lmforge.load(hf_dir, device="cpu")
    model = GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    tok = PreTrainedTokenizerFast.from_pretrained(hf_dir)

    capitals = load_task(TASKS / "capitals.yaml")
    result = run_task(lm, capitals, seed=0, progress=False)
    assert result["truncated"] == 0
    acc, acc_norm = [], []
    for i, (example, detail) in enumerate(zip(capitals.examples, result["details"])):
        context, choices = capitals.context(i, seed=0), example.doc["options"]
        # The context ends without a space and each continuation starts with one, so no whitespace moves.
        assert not context[-1].isspace()
        lls = [transformers_loglikelihood(model, tok, context, " " + c) for c in choices]
        assert detail["loglikelihoods"] == pytest.approx(lls, rel=1e-4)
        normed = [ll / len(c) for ll, c in zip(lls, choices)]
        acc.append(float(lls.index(max(lls)) == example.doc["gold"]))
        acc_norm.append(float(normed.index(max(normed)) == example.doc["gold"]))
    assert result["metrics"] == {"acc": sum(acc) / len(acc), "acc_norm": sum(acc_norm) / len(acc_norm)}

    proverbs = load_task(TASKS / "proverbs.yaml")
    result = run_task(lm, proverbs, progress=False)
    expected = [transformers_loglikelihood(model, tok, e.doc["start"], " " + e.doc["end"]) for e in proverbs.examples]
    assert [d["loglikelihood"] for d in result["details"]] == pytest.approx(expected, rel=1e-4)


def test_an_hf_directory_evaluates_end_to_end_with_provenance(hf_dir: Path, tmp_path: Path) -> None:
    """`lmforge.evaluate` on an HF folder hashes its safetensors weights and adds no metrics.jsonl to it."""
    before = sorted(p.name for p in hf_dir.iterdir())
    out = tmp_path / "eval.json"
    lmforge.evaluate(model=hf_dir, tasks=[TASKS / "proverbs.yaml"], out=out, progress=False, device="cpu")
    report = json.loads(out.read_text())
    assert report["model"]["weights"] == ["model.safetensors"]
    assert report["model"]["weights_sha256"] == hashlib.sha256((hf_dir / "model.safetensors").read_bytes()).hexdigest()
    assert sorted(p.name for p in hf_dir.iterdir()) == before
