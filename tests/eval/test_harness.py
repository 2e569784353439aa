"""The harness: loglikelihoods equal a direct forward pass whatever the batch, acc/acc_norm as lm-evaluation-harness
defines them, left truncation counted, generation/classification/code scored with the metric functions."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from lmforge.errors import ConfigError, DataError
from lmforge.eval import metrics as M
from lmforge.eval.harness import Unsupported, run_task
from lmforge.eval.sandbox import Limits, run_python
from lmforge.eval.tasks import CODE_STOP, Task, load_task
from lmforge.lm import LM

CONTEXT = 64


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models spend their time in thread synchronisation on a busy 2-core CI box (7x slower measured); one
    thread is faster, and every comparison in this file is within one process."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def lm(make_lm: Callable[..., LM]) -> LM:
    return make_lm("gpt2-tiny", hidden_size=64, max_position_embeddings=CONTEXT)


def make_task(tmp_path: Path, yaml_text: str, rows: list[dict]) -> Task:
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    (tmp_path / "task.yaml").write_text("data: data.jsonl\n" + yaml_text)
    return load_task(tmp_path / "task.yaml")


@torch.no_grad()
def direct_loglikelihood(lm: LM, context: str, continuation: str) -> tuple[float, bool]:
    """lm-evaluation-harness's split, computed independently: one unbatched forward pass over eos + text,
    keeping only the last CONTEXT inputs."""
    while context and context[-1].isspace():
        context, continuation = context[:-1], context[-1] + continuation
    ctx = lm.tokenizer.encode(context)
    cont = lm.tokenizer.encode(context + continuation)[len(ctx):]
    ids = [lm.tokenizer.eos_id, *ctx, *cont][-(CONTEXT + 1):]
    logp = F.log_softmax(lm.model(torch.tensor([ids[:-1]])).double(), dim=-1)[0]
    positions = range(len(ids) - 1 - len(cont), len(ids) - 1)
    total = sum(logp[p, t].item() for p, t in zip(positions, cont))
    greedy = all(logp[p].argmax().item() == t for p, t in zip(positions, cont))
    return total, greedy


PROVERBS = [{"start": s, "end": e} for s, e in [
    ("Actions speak louder than", "words."), ("A stitch in time saves", "nine."),
    ("Don't count your chickens before", "they hatch."), ("naïve café", "你好 🙂"),
    ("When in Rome, do as", "the Romans do, and when elsewhere, do as the locals do there."), ("x =", " [1, 2]")]]


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_loglikelihoods_equal_a_direct_forward_pass_whatever_the_batch(lm: LM, tmp_path: Path,
                                                                       batch_size: int) -> None:
    """Right-padded batches of different lengths give each continuation exactly its unbatched loglikelihood."""
    task = make_task(tmp_path, "kind: loglikelihood\nprompt: '{{start}}'\ncontinuation: '{{end}}'\n"
                               "metrics: [loglikelihood, perplexity, bits_per_byte, acc]\n", PROVERBS)
    result = run_task(lm, task, batch_size=batch_size, progress=False)
    expected = [direct_loglikelihood(lm, r["start"], " " + r["end"]) for r in PROVERBS]
    got = [d["loglikelihood"] for d in result["details"]]
    assert got == pytest.approx([e[0] for e in expected], rel=1e-5)
    assert [d["greedy"] for d in result["details"]] == [e[1] for e in expected]
    tokens = sum(d["tokens"] for d in result["details"])
    n_bytes = sum(len((" " + r["end"]).encode()) for r in PROVERBS)
    assert result["metrics"]["loglikelihood"] == pytest.approx(sum(got) / len(got))
    assert result["metrics"]["perplexity"] == pytest.approx(math.exp(-sum(got) / tokens))
    assert result["metrics"]["bits_per_byte"] == pytest.approx(-sum(got) / (math.log(2) * n_bytes))
    assert result["truncated"] == 0


def test_multiple_choice_acc_and_acc_norm_follow_lm_evaluation_harness(lm: LM, tmp_path: Path) -> None:
    """acc = argmax of the choices' loglikelihoods; acc_norm = argmax of loglikelihood / len(choice) (characters),
    each compared with the gold index; both averaged over examples."""
    rows = [{"q": "What is the capital of France?", "options": ["Paris", "Lyon", "a small village in the Alps"],
             "gold": 0},
            {"q": "Which is a colour?", "options": ["blue", "seven", "running quickly"], "gold": 0},
            {"q": "What do cats say?", "options": ["woof", "meow", "nothing at all, usually"], "gold": 1},
            {"q": "Opposite of up?", "options": ["down", "sideways and then back again"], "gold": 1}]
    task = make_task(tmp_path, "kind: multiple_choice\nprompt: \"Question: {{q}}\\nAnswer:\"\nchoices: options\n"
                               "answer: gold\n", rows)
    result = run_task(lm, task, progress=False)
    acc, acc_norm = [], []
    for row, detail in zip(rows, result["details"]):
        lls = [direct_loglikelihood(lm, f"Question: {row['q']}\nAnswer:", " " + c)[0] for c in row["options"]]
        assert detail["loglikelihoods"] == pytest.approx(lls, rel=1e-5)
        normed = [ll / len(c) for ll, c in zip(lls, row["options"])]
        acc.append(float(lls.index(max(lls)) == row["gold"]))
        acc_norm.append(float(normed.index(max(normed)) == row["gold"]))
    assert result["metrics"] == {"acc": sum(acc) / 4, "acc_norm": sum(acc_norm) / 4}


def test_long_prompts_are_truncated_from_the_left_with_a_counted_warning(lm: LM, tmp_path: Path) -> None:
    """Prompts past the context keep their last tokens, are scored like that, and one warning gives the count."""
    long = " ".join(["the model learns to predict the next word from context"] * 12)
    rows = [{"start": long, "end": "and data."}, {"start": "short one", "end": "here."},
            {"start": long + " again", "end": "for the test."}]
    task = make_task(tmp_path, "kind: loglikelihood\nprompt: '{{start}}'\ncontinuation: '{{end}}'\n", rows)
    with pytest.warns(UserWarning, match=r"2 of 3 prompts were longer than the model's context \(64 tokens\)"):
        result = run_task(lm, task, progress=False)
    assert result["truncated"] == 2
    expected = [direct_loglikelihood(lm, r["start"], " " + r["end"])[0] for r in rows]
    assert [d["loglikelihood"] for d in result["details"]] == pytest.approx(expected, rel=1e-5)


def test_a_continuation_longer_than_the_context_is_an_error_naming_its_line(lm: LM, tmp_path: Path) -> None:
    """Cutting the context cannot make room for it, and scoring part of it would be a different number."""
    rows = [{"start": "short", "end": "fine."}, {"start": "long", "end": " ".join(["word"] * (CONTEXT + 10))}]
    task = make_task(tmp_path, "kind: loglikelihood\nprompt: '{{start}}'\ncontinuation: '{{end}}'\n", rows)
    with pytest.raises(DataError, match=rf"{tmp_path / 'data.jsonl'}:2: a continuation of \d+ tokens is longer"):
        run_task(lm, task, progress=False)


def test_generation_is_greedy_and_scored_with_the_metric_functions(lm: LM, tmp_path: Path) -> None:
    """Predictions are the greedy completions lm.generate gives; EM/F1/BLEU/ROUGE are metrics.py's on them."""
    rows = [{"w": "hot", "refs": ["cold"]}, {"w": "up", "refs": ["down"]}, {"w": "open", "refs": ["closed", "shut"]}]
    task = make_task(tmp_path, "kind: generation\nprompt: 'Opposite of {{w}}:'\nreferences: refs\nmax_new_tokens: 6\n"
                               "stop: [\"\\n\"]\nfewshot: 1\nmetrics: [exact_match, f1, bleu, rouge1]\n", rows)
    result = run_task(lm, task, seed=3, progress=False)
    predictions = [lm.generate(task.context(i, 3), max_new_tokens=6, temperature=0, stop=["\n"]).strip()
                   for i in range(3)]
    assert [d["prediction"] for d in result["details"]] == predictions
    refs = [r["refs"] for r in rows]
    assert result["metrics"]["exact_match"] == sum(M.exact_match(p, r) for p, r in zip(predictions, refs)) / 3
    assert result["metrics"]["f1"] == sum(M.token_f1(p, r) for p, r in zip(predictions, refs)) / 3
    assert result["metrics"]["bleu"] == M.bleu(predictions, [["cold", "cold"], ["down", "down"], ["closed", "shut"]])
    assert result["metrics"]["rouge1"] == M.rouge(predictions, ["cold", "down", "closed"], types=["rouge1"])["rouge1"]


class ScriptedLM(LM):
    """TEST DOUBLE: a real tiny LM whose `generate` returns scripted completions in order, so scoring and the
    sandbox are tested against known answers. The library never scripts outputs."""

    def __init__(self, base: LM, completions: list[str]) -> None:
        super().__init__(base.model, base.tokenizer, base.generation_config)
        self.completions = list(completions)

    def generate(self, prompt: str | list[str], **sampling: object) -> str | list[str]:
        if isinstance(prompt, list):
            return [self.completions.pop(0) for _ in prompt]
        return self.completions.pop(0)


def test_generation_metrics_on_known_answers(lm: LM, tmp_path: Path) -> None:
    """With predictions "cold", " Down." and "open": EM 2/3 (SQuAD normalisation) and token F1 2/3."""
    rows = [{"w": "hot", "refs": ["cold"]}, {"w": "up", "refs": ["down"]}, {"w": "open", "refs": ["closed", "shut"]}]
    task = make_task(tmp_path, "kind: generation\nprompt: '{{w}}'\nreferences: refs\n", rows)
    result = run_task(ScriptedLM(lm, ["cold", " Down.", "open"]), task, progress=False)
    assert result["metrics"] == {"exact_match": pytest.approx(2 / 3), "f1": pytest.approx(2 / 3)}


class KeywordClassifier:
    """TEST DOUBLE for a model with a classification head (not built yet): labels a text positive when it contains
    "good". It exercises the `predict(texts) -> [(label, probs)]` protocol; the library never fakes predictions."""

    def predict(self, texts: list[str]) -> list[tuple[str, dict[str, float]]]:
        return [("positive", {"positive": 0.9, "negative": 0.1}) if "good" in t else
                ("negative", {"positive": 0.2, "negative": 0.8}) for t in texts]


def test_classification_goes_through_the_predict_protocol(lm: LM, tmp_path: Path) -> None:
    rows = [{"t": "good food", "y": "positive"}, {"t": "good grief, awful", "y": "negative"},
            {"t": "bad service", "y": "negative"}, {"t": "lovely view", "y": "positive"}]
    task = make_task(tmp_path, "kind: classification\nprompt: '{{t}}'\nlabel: y\n"
                               "metrics: [accuracy, f1, precision, recall]\n", rows)
    result = run_task(KeywordClassifier(), task, progress=False)
    gold, pred = [r["y"] for r in rows], ["positive", "positive", "negative", "negative"]
    prf = M.precision_recall_f1(gold, pred, average="macro")
    assert result["metrics"] == {"accuracy": 0.5, "f1": prf["f1"], "precision": prf["precision"],
                                 "recall": prf["recall"]}
    assert result["confusion_matrix"] == {"labels": ["negative", "positive"], "matrix": [[1, 1], [1, 1]]}
    assert result["details"][0]["probs"] == {"positive": 0.9, "negative": 0.1}
    with pytest.raises(Unsupported, match="no classification head"):
        run_task(lm, task, progress=False)


@pytest.mark.slow
def test_code_tasks_count_passes_and_survive_hostile_completions(lm: LM, tmp_path: Path) -> None:
    """Per problem, samples run with the tests in the sandbox: a correct body passes; a wrong one, an infinite
    loop, a fork bomb and a write outside the working directory fail; pass@k is the unbiased estimator."""
    try:
        run_python("pass", Limits(timeout=10))
    except ConfigError:
        pytest.skip("Linux namespaces unavailable here (needs root or user namespaces)")
    rows = [{"p": "def add(a, b):\n", "t": "assert add(2, 3) == 5\n"},
            {"p": "def double(x):\n", "t": "assert double(4) == 8\n"}]
    task = make_task(tmp_path, "kind: code\nprompt: '{{p}}'\ntests: t\nsamples: 3\ntimeout: 1\nmax_new_tokens: 16\n"
                               "metrics: [pass@1, pass@2]\n", rows)
    outside = tmp_path / "escaped.txt"
    completions = ["    return a + b\n", "    while True:\n        pass\n", "    return a - b\n",
                   "    import os\n    while True:\n        try:\n            os.fork()\n        except OSError:\n"
                   "            pass\n",
                   f"    open({str(outside)!r}, 'w').write('x')\n    return 2 * x\n", "    return x * 2\n"]
    result = run_task(ScriptedLM(lm, completions), task, progress=False)
    statuses = [[r["status"] for r in d["runs"]] for d in result["details"]]
    assert statuses == [["passed", "timeout", "failed"], ["timeout", "failed", "passed"]]
    assert not outside.exists()
    assert result["metrics"] == {"pass@1": pytest.approx((M.pass_at_k(3, 1, 1) + M.pass_at_k(3, 1, 1)) / 2),
                                 "pass@2": pytest.approx(M.pass_at_k(3, 1, 2))}


def test_generation_tasks_decode_in_one_batch_equal_to_one_at_a_time(make_lm: Callable[..., LM], tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A generation task's prompts and a code task's seeded samples go through the engine together (more than
    one request per decode step), and every completion equals its own lm.generate call."""
    from lmforge.eval import harness
    from lmforge.infer.engine import Engine

    lm = make_lm("gpt2-tiny", hidden_size=64, max_position_embeddings=CONTEXT)
    lm.model.double()  # batched and single-row matmuls then agree far below any argmax near-tie
    batch_sizes = []
    decode = Engine._decode

    def counting(self: Engine, outputs: list) -> None:
        batch_sizes.append(len(self.running))
        decode(self, outputs)

    monkeypatch.setattr(Engine, "_decode", counting)
    rows = [{"w": w, "refs": [w]} for w in ("hot", "up", "open", "the model learns", "x")]
    task = make_task(tmp_path, "kind: generation\nprompt: 'Opposite of {{w}}:'\nreferences: refs\nmax_new_tokens: 6\n"
                               "stop: [\" the\"]\nmetrics: [exact_match]\n", rows)
    result = run_task(lm, task, seed=3, progress=False)
    assert max(batch_sizes) > 1
    assert [d["prediction"] for d in result["details"]] == [
        lm.generate(task.context(i, 3), max_new_tokens=6, temperature=0, stop=[" the"]).strip() for i in range(5)]

    batch_sizes.clear()
    monkeypatch.setattr(harness, "check_isolation", lambda isolate: None)
    monkeypatch.setattr(harness, "run_python", lambda code, limits, isolate: SimpleNamespace(status="failed",
                                                                                             stderr=""))
    (tmp_path / "code").mkdir()
    problems = [{"p": "def f(", "t": "pass"}, {"p": "x =", "t": "pass"}]
    task = make_task(tmp_path / "code", "kind: code\nprompt: '{{p}}'\ntests: t\nsamples: 3\nmax_new_tokens: 8\n"
                                        "metrics: [pass@1]\n", problems)
    result = run_task(lm, task, seed=5, progress=False)
    assert max(batch_sizes) > 1
    got = [r["completion"] for d in result["details"] for r in d["runs"]]
    assert got == [lm.generate(task.context(i, 5), max_new_tokens=8, temperature=0.8, stop=task.options.get(
        "stop", CODE_STOP), seed=5 + 1000 * i + j) for i in range(2) for j in range(3)]
    assert len(set(got[:3])) > 1  # the samples of one problem differ: each kept its own seed
