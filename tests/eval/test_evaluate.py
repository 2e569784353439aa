"""`lmforge eval` end to end: the shipped tasks from the CLI and Python, provenance in the report, the Markdown
table, the metrics.jsonl line, `--task perplexity`, `eval compare`, and bad input as a clean error."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

import lmforge
from lmforge.cli import main
from lmforge.errors import ConfigError
from lmforge.eval.sandbox import Limits, run_python
from lmforge.lm import LM

TASKS = Path(__file__).resolve().parents[2] / "tasks"


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models spend their time in thread synchronisation on a busy 2-core CI box (7x slower measured); one
    thread is faster, and every comparison in this file is within one process."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def sandbox_flag() -> list[str]:
    """Where namespaces are unavailable the code task needs the explicit opt-out; in CI (root) they are there."""
    try:
        run_python("pass", Limits(timeout=10))
        return []
    except ConfigError:
        return ["--unsafe-no-sandbox", "true"]


def sha256(*paths: Path) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def checkpoint(make_checkpoint: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint("gpt2-tiny", out=tmp_path_factory.mktemp("eval_ckpt") / "run",
                           max_position_embeddings=128)


def test_eval_on_the_shipped_tasks_writes_every_number_with_its_provenance(
        checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`lmforge eval --model CKPT --tasks tasks/ --out eval.json`: one result per runnable task, the model's weight
    hash, each task's file+data hash, seed and version; eval.md beside it; a line in the run's metrics.jsonl."""
    out = tmp_path / "eval.json"
    code, stdout, err = run(["eval", "--model", checkpoint, "--tasks", TASKS, "--out", out, "--seed", "5",
                             "--progress", "false", *sandbox_flag()], capsys)
    assert code == 0, err
    report = json.loads(out.read_text())
    assert set(report["tasks"]) == {"capitals", "proverbs", "antonyms", "python_functions"}
    assert report["skipped"]["sentiment"]["reason"].startswith("this model has no classification head")
    assert report["model"]["path"] == str(checkpoint.resolve())
    assert report["model"]["weights_sha256"] == sha256(checkpoint / "model.safetensors")
    assert (report["seed"], report["lmforge_version"]) == (5, lmforge.__version__)
    capitals = report["tasks"]["capitals"]
    assert capitals["sha256"] == sha256(TASKS / "capitals.yaml", TASKS / "data" / "capitals.jsonl")
    assert len(capitals["details"]) == capitals["examples"] == 12
    assert capitals["metrics"]["acc"] == sum(d["pred"] == d["gold"] for d in capitals["details"]) / 12
    assert len(report["tasks"]["python_functions"]["details"][0]["runs"]) == 2
    assert json.loads(stdout)["capitals"] == capitals["metrics"]
    table = (tmp_path / "eval.md").read_text()
    assert f"| capitals | multiple_choice | acc | {capitals['metrics']['acc']:.4f} | 12 |" in table
    assert "sentiment: skipped" in table
    line = json.loads((checkpoint / "metrics.jsonl").read_text().splitlines()[-1])
    assert line["event"] == "eval" and line["step"] == 0 and line["report"] == str(out.resolve())
    assert line["eval/capitals/acc_norm"] == capitals["metrics"]["acc_norm"]
    assert "loss" not in line  # training-curve readers pick rows by their "loss" key


def test_task_perplexity_is_the_eval_perplexity_verb_with_provenance(
        checkpoint: Path, tmp_path: Path, tiny_docs: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """`eval --task perplexity --data F` reports what the unchanged `eval perplexity` verb computes."""
    data = tmp_path / "held_out.txt"
    data.write_text("\n\n".join(tiny_docs[:3]))
    code, stdout, err = run(["eval", "perplexity", "--model", checkpoint, "--data", data, "--progress", "false"],
                            capsys)
    assert code == 0, err
    direct = json.loads(stdout)
    out = tmp_path / "ppl.json"
    code, _, err = run(["eval", "--model", checkpoint, "--task", "perplexity", "--data", data, "--out", out,
                        "--progress", "false"], capsys)
    assert code == 0, err
    result = json.loads(out.read_text())["tasks"]["perplexity"]
    assert result["metrics"] == {k: direct[k] for k in ("perplexity", "bits_per_byte", "nll")}
    assert result["data_sha256"] == sha256(data)


def test_compare_prints_both_reports_and_the_deltas(
        make_lm: Callable[..., LM], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`lmforge eval compare a.json b.json` (and lmforge.eval.compare) show a, b and b − a per task and metric."""
    reports = []
    for seed in (0, 1):
        out = tmp_path / f"eval_{seed}.json"
        summary = lmforge.evaluate(model=make_lm("gpt2-tiny", seed=seed), tasks=[TASKS / "proverbs.yaml"], out=out,
                                   progress=False)
        assert summary["out"] == str(out)
        reports.append(json.loads(out.read_text()))
    a, b = (r["tasks"]["proverbs"]["metrics"]["loglikelihood"] for r in reports)
    table = lmforge.eval.compare(tmp_path / "eval_0.json", tmp_path / "eval_1.json")
    delta = b - a
    assert f"| proverbs | loglikelihood | {a:.4f} | {b:.4f} | {'+' if delta > 0 else ''}{delta:.4f} |" in table
    code, stdout, _ = run(["eval", "compare", tmp_path / "eval_0.json", tmp_path / "eval_1.json"], capsys)
    assert code == 0 and stdout.strip() == table.strip()


def test_an_unknown_metric_is_a_clean_error_naming_file_line_and_known_metrics(
        checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    task = tmp_path / "bad.yaml"
    task.write_text((TASKS / "capitals.yaml").read_text().replace("[acc, acc_norm]", "[acc, f1]")
                    .replace("data/capitals.jsonl", str(TASKS / "data" / "capitals.jsonl")))
    line = next(i for i, text in enumerate(task.read_text().splitlines(), 1) if text.startswith("metrics"))
    code, _, err = run(["eval", "--model", checkpoint, "--tasks", task], capsys)
    assert code == 2
    assert f"error: {task}:{line}: unknown metric 'f1' for a multiple_choice task; known: acc, acc_norm" in err
    assert "Traceback" not in err


def test_eval_without_tasks_and_compare_of_a_non_report_are_errors(
        checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["eval", "--model", checkpoint], capsys)
    assert code == 2 and "nothing to evaluate" in err
    (tmp_path / "x.json").write_text("[1, 2]")
    code, _, err = run(["eval", "compare", tmp_path / "x.json", tmp_path / "x.json"], capsys)
    assert code == 2 and "not an lmforge eval report" in err


@pytest.mark.parametrize("verb", ["run", "compare", "perplexity"])
def test_eval_subcommands_have_help_from_their_docstrings(
        verb: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "500")
    code, out, _ = run(["eval", verb, "--help"], capsys)
    first_line = {"run": "Evaluate a model on task files", "compare": "Compare evaluation reports side by side",
                  "perplexity": "Perplexity and bits per byte"}[verb]
    assert code == 0 and first_line in out


def test_a_classification_head_run_is_scored_through_predict(
        make_checkpoint: Callable[..., Path], tmp_path: Path) -> None:
    """A `finetune classify` run evaluates the shipped sentiment task with the labels `lmforge predict` gives;
    a language-model task is skipped for it, with the reason in the report."""
    from lmforge.methods.classify import finetune_classify, predict

    base = make_checkpoint("gpt2-tiny", out=tmp_path / "base", max_position_embeddings=64)
    data = TASKS / "data" / "sentiment.jsonl"
    run = finetune_classify(base, data, tmp_path / "cls", text_field="review", label_field="sentiment",
                            max_steps=2, batch_size=4, warmup_steps=1, precision="32", progress=False)
    out = tmp_path / "eval.json"
    summary = lmforge.evaluate(model=run, tasks=[TASKS / "sentiment.yaml", TASKS / "proverbs.yaml"], out=out,
                               progress=False)
    assert "no task could run" not in json.dumps(summary)
    report = json.loads(out.read_text())
    assert "a loglikelihood task needs a language model" in report["skipped"]["proverbs"]["reason"]
    predicted = predict(run, data, tmp_path / "pred.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "pred.jsonl").read_text().splitlines()]
    details = report["tasks"]["sentiment"]["details"]
    assert [d["pred"] for d in details] == [r["label"] for r in rows]
    assert report["tasks"]["sentiment"]["metrics"]["accuracy"] == pytest.approx(predicted["accuracy"])
    assert {"head.safetensors", "model.safetensors"} <= set(report["model"]["weights"])
