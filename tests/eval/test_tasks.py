"""Task files: the shipped examples load; every kind of bad input is an error naming its file and line;
few-shot examples are drawn reproducibly and never include the question itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmforge.errors import ConfigError, DataError
from lmforge.eval.tasks import METRICS, find_tasks, load_task

TASKS = Path(__file__).resolve().parents[2] / "tasks"
DOCS_QA = Path(__file__).resolve().parents[2] / "datasets" / "docs-qa"  # the retrieval / document_qa tasks

MC = """\
kind: multiple_choice
data: data.jsonl
prompt: "Q: {{question}}\\nA:"
choices: options
answer: gold
fewshot: 2
"""
ROWS = [{"question": f"question {i}?", "options": ["yes", "no", "maybe"], "gold": i % 3} for i in range(6)]


def write_task(tmp_path: Path, yaml_text: str, rows: list | None = None, raw: str | None = None) -> Path:
    (tmp_path / "data.jsonl").write_text(raw if raw is not None else
                                         "".join(json.dumps(r) + "\n" for r in (ROWS if rows is None else rows)))
    path = tmp_path / "task.yaml"
    path.write_text(yaml_text)
    return path


def test_every_shipped_example_task_loads_and_covers_every_kind() -> None:
    tasks = [load_task(p) for p in find_tasks([TASKS, DOCS_QA / "retrieval", DOCS_QA / "qa"])]
    assert {t.kind for t in tasks} == set(METRICS)
    assert all(len(t.examples) >= 5 for t in tasks)


def test_malformed_yaml_names_the_line(tmp_path: Path) -> None:
    path = write_task(tmp_path, "kind: multiple_choice\ndata: data.jsonl\nprompt: [unclosed\nchoices: options\n")
    with pytest.raises(ConfigError, match=rf"{path}:\d+: malformed YAML"):
        load_task(path)


def test_unknown_key_names_its_line_and_the_known_keys(tmp_path: Path) -> None:
    path = write_task(tmp_path, MC + "few_shot: 3\n")
    with pytest.raises(ConfigError, match=rf"{path}:7: unknown key 'few_shot'.*known: .*fewshot"):
        load_task(path)


def test_unknown_metric_lists_the_known_ones(tmp_path: Path) -> None:
    path = write_task(tmp_path, MC + "metrics: [acc, accuracy_norm]\n")
    with pytest.raises(ConfigError, match=rf"{path}:7: unknown metric 'accuracy_norm'.*known: acc, acc_norm"):
        load_task(path)


def test_pass_at_k_needs_k_samples(tmp_path: Path) -> None:
    rows = [{"prompt": "def f():\n", "tests": "assert f() is None\n"}]
    path = write_task(tmp_path, "kind: code\ndata: data.jsonl\nprompt: '{{prompt}}'\ntests: tests\nsamples: 2\n"
                                "metrics: [pass@1, pass@5]\n", rows)
    with pytest.raises(ConfigError, match=rf"{path}:6: pass@5 needs at least 5 samples"):
        load_task(path)


def test_unknown_kind_lists_the_kinds(tmp_path: Path) -> None:
    path = write_task(tmp_path, MC.replace("multiple_choice", "quiz"))
    with pytest.raises(ConfigError, match=rf"{path}:1: kind must be one of multiple_choice, loglikelihood"):
        load_task(path)


def test_malformed_jsonl_line_is_named(tmp_path: Path) -> None:
    raw = json.dumps(ROWS[0]) + "\n" + json.dumps(ROWS[1]) + "\n{not json\n"
    path = write_task(tmp_path, MC, raw=raw)
    with pytest.raises(DataError, match=rf"{tmp_path / 'data.jsonl'}:3: malformed JSON"):
        load_task(path)


def test_a_field_the_prompt_needs_missing_names_the_data_line(tmp_path: Path) -> None:
    rows = [*ROWS[:4], {"options": ["a", "b"], "gold": 0}]
    path = write_task(tmp_path, MC, rows)
    with pytest.raises(DataError, match=rf"{tmp_path / 'data.jsonl'}:5: prompt template needs a field.*question"):
        load_task(path)


@pytest.mark.parametrize("gold", [3, "perhaps", None])
def test_an_answer_outside_the_choices_names_the_data_line(tmp_path: Path, gold: object) -> None:
    rows = [*ROWS[:2], {**ROWS[2], "gold": gold}, *ROWS[3:]]
    with pytest.raises(DataError, match=rf"{tmp_path / 'data.jsonl'}:3: answer"):
        load_task(write_task(tmp_path, MC, rows))


@pytest.mark.parametrize("refs", ["", [], ["fine", "  "]])
def test_empty_references_are_an_error_not_a_silent_zero(tmp_path: Path, refs: object) -> None:
    yaml_text = "kind: generation\ndata: data.jsonl\nprompt: 'Say {{w}}'\nreferences: refs\n"
    rows = [{"w": "a", "refs": ["a"]}, {"w": "b", "refs": refs}]
    with pytest.raises(DataError, match=rf"{tmp_path / 'data.jsonl'}:2: references must be .*empty reference"):
        load_task(write_task(tmp_path, yaml_text, rows))


def test_more_fewshot_examples_than_there_are_is_an_error(tmp_path: Path) -> None:
    path = write_task(tmp_path, MC.replace("fewshot: 2", "fewshot: 6"))
    with pytest.raises(ConfigError, match=rf"{path}:6: fewshot: 6 but only 5 other examples"):
        load_task(path)


def test_a_missing_required_key_is_named(tmp_path: Path) -> None:
    path = write_task(tmp_path, MC.replace("answer: gold\n", ""))
    with pytest.raises(ConfigError, match=rf"{path}:1: a multiple_choice task needs 'answer'"):
        load_task(path)


def test_fewshot_examples_are_reproducible_per_seed_and_exclude_the_question(tmp_path: Path) -> None:
    task = load_task(write_task(tmp_path, MC))
    for i, example in enumerate(task.examples):
        context = task.context(i, seed=7)
        assert context == task.context(i, seed=7)
        shots = context.split("\n\n")
        assert len(shots) == 3 and shots[-1] == f"Q: {example.doc['question']}\nA:"
        assert all(example.doc["question"] not in shot for shot in shots[:-1])
        for shot in shots[:-1]:  # each shot is a solved example: its prompt, a space, its correct answer
            row = next(r for r in ROWS if shot.startswith(f"Q: {r['question']}"))
            assert shot == f"Q: {row['question']}\nA: {row['options'][row['gold']]}"
    contexts = {seed: [task.context(i, seed) for i in range(len(task.examples))] for seed in range(5)}
    assert len({tuple(c) for c in contexts.values()}) > 1


def test_a_folder_with_no_task_files_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no task files"):
        find_tasks([tmp_path])
