"""Evaluation tasks: a small YAML file (what to ask, how to score) plus JSONL data (one example a line).

```yaml
kind: multiple_choice          # multiple_choice | loglikelihood | generation | classification | code
                               # | retrieval | document_qa (documents, lmforge/eval/qa.py)
data: capitals.jsonl           # relative to this file
prompt: "Question: What is the capital of {{country}}?\\nAnswer:"   # Jinja, over each example's fields
choices: options               # multiple_choice: a field holding the list of answers (or a literal list)
answer: gold                   # multiple_choice: field with the correct index or answer text
fewshot: 2                     # solved examples shown before each question, drawn with a fixed seed
metrics: [acc, acc_norm]
```

Prompts are Jinja templates as in lm-evaluation-harness; a field missing from an example is an error
naming the data file and line, never an empty string. Every error names the file and line at fault.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lmforge.errors import ConfigError, DataError

KINDS = ("multiple_choice", "loglikelihood", "generation", "classification", "code", "retrieval", "document_qa")
METRICS: dict[str, tuple[str, ...]] = {
    "multiple_choice": ("acc", "acc_norm"),
    "loglikelihood": ("loglikelihood", "perplexity", "bits_per_byte", "acc"),
    "generation": ("exact_match", "f1", "bleu", "chrf", "ter", "rouge1", "rouge2", "rougeL"),
    "classification": ("accuracy", "precision", "recall", "f1", "f1_weighted", "f1_micro"),
    "code": ("pass@k",),  # pass@1, pass@10, ...: k at most `samples`
    "retrieval": ("recall@k", "mrr"),  # recall@1, recall@5, ... (lmforge.eval.qa)
    "document_qa": ("exact_match", "f1", "source_accuracy"),
}
DEFAULT_METRICS = {"multiple_choice": ["acc", "acc_norm"], "loglikelihood": ["loglikelihood", "perplexity", "acc"],
                   "generation": ["exact_match", "f1"], "classification": ["accuracy", "f1"], "code": ["pass@1"],
                   "retrieval": ["recall@1", "recall@5", "mrr"], "document_qa": ["exact_match", "f1"]}
# Model code usually goes on past the function asked for; HumanEval (Chen et al. 2021) cuts it here.
CODE_STOP = ["\nclass ", "\ndef ", "\n#", "\nif __name__", "\nprint("]
_PASS_AT = re.compile(r"^pass@([1-9][0-9]*)$")
_RECALL_AT = re.compile(r"^recall@([1-9][0-9]*)$")

COMMON = {"name", "kind", "data", "prompt", "description", "fewshot", "fewshot_data", "fewshot_delimiter",
          "target_delimiter", "metrics"}
KIND_KEYS = {
    "multiple_choice": {"choices", "answer"},
    "loglikelihood": {"continuation"},
    "generation": {"references", "max_new_tokens", "stop"},
    "classification": {"label"},
    "code": {"tests", "samples", "temperature", "max_new_tokens", "stop", "timeout", "memory_mb"},
    "retrieval": {"documents", "sources", "mode"},
    "document_qa": {"documents", "references", "sources", "mode", "encoder", "k", "max_new_tokens"},
}
REQUIRED = {"multiple_choice": ("choices", "answer"), "loglikelihood": ("continuation",),
            "generation": ("references",), "classification": ("label",), "code": ("tests",),
            "retrieval": ("documents", "sources"), "document_qa": ("documents", "references")}


class Unsupported(Exception):
    """This model cannot run this kind of task (e.g. classification without a head): the task is skipped."""


@dataclass
class Example:
    doc: dict[str, Any]
    line: int  # 1-based line in `source`, for error messages
    source: Path


@dataclass
class Task:
    """A validated task file; `examples` are read and checked when it loads."""

    path: Path
    name: str
    kind: str
    data: Path
    prompt: str
    metrics: list[str]
    options: dict[str, Any]  # the kind-specific keys (choices, answer, references, ...)
    lines: dict[str, int]  # YAML key → line, to point errors at the right place
    examples: list[Example] = field(default_factory=list)
    fewshot_pool: list[Example] = field(default_factory=list)
    fewshot_data: Path | None = None
    fewshot: int = 0
    fewshot_delimiter: str = "\n\n"
    target_delimiter: str = " "
    description: str = ""

    def where(self, key: str) -> str:
        return f"{self.path}:{self.lines.get(key, 1)}"

    def sha256(self) -> str:
        """Hash of the YAML and its data files, so a result names exactly what was asked."""
        h = hashlib.sha256()
        for path in dict.fromkeys([self.path, self.data, *([self.fewshot_data] if self.fewshot_data else [])]):
            h.update(Path(path).read_bytes())
        return h.hexdigest()

    # ---- rendering -------------------------------------------------------------------------------

    def render(self, template: str, example: Example, what: str) -> str:
        from jinja2 import TemplateError, UndefinedError

        try:
            return _template(template).render(**example.doc)
        except UndefinedError as e:
            raise DataError(f"{example.source}:{example.line}: {what} template needs a field this example lacks "
                            f"({e.message}; fields: {sorted(example.doc)})") from None
        except TemplateError as e:
            raise ConfigError(f"{self.where(what)}: {what} template: {e}") from None

    def choices(self, example: Example) -> list[str]:
        spec = self.options["choices"]
        value = spec if isinstance(spec, list) else _field(self, example, spec)
        if not isinstance(value, list) or len(value) < 2 or not all(isinstance(c, str) and c for c in value):
            raise DataError(f"{example.source}:{example.line}: choices must be a list of at least two non-empty "
                            f"strings, got {value!r}")
        return value

    def answer_index(self, example: Example) -> int:
        choices, gold = self.choices(example), _field(self, example, self.options["answer"])
        if isinstance(gold, bool) or not isinstance(gold, (int, str)):
            raise DataError(f"{example.source}:{example.line}: answer must be an index or one of the choices, "
                            f"got {gold!r}")
        if isinstance(gold, str):
            if gold not in choices:
                raise DataError(f"{example.source}:{example.line}: answer {gold!r} is not one of the choices {choices}")
            return choices.index(gold)
        if not 0 <= gold < len(choices):
            raise DataError(f"{example.source}:{example.line}: answer index {gold} is out of range for "
                            f"{len(choices)} choices")
        return gold

    def references(self, example: Example) -> list[str]:
        value = _field(self, example, self.options["references"])
        refs = [value] if isinstance(value, str) else value
        if not isinstance(refs, list) or not refs or not all(isinstance(r, str) and r.strip() for r in refs):
            raise DataError(f"{example.source}:{example.line}: references must be a non-empty string or a non-empty "
                            f"list of non-empty strings, got {value!r}; an empty reference would score 0 silently")
        return refs

    def label(self, example: Example) -> str:
        value = _field(self, example, self.options["label"])
        if isinstance(value, (dict, list)) or value is None or str(value) == "":
            raise DataError(f"{example.source}:{example.line}: label must be a non-empty string or number, "
                            f"got {value!r}")
        return str(value)

    def target(self, example: Example) -> str:
        """The answer shown after the prompt in a few-shot example."""
        if self.kind == "multiple_choice":
            return self.choices(example)[self.answer_index(example)]
        if self.kind == "loglikelihood":
            return self.render(self.options["continuation"], example, "continuation")
        return self.references(example)[0]

    def context(self, index: int, seed: int) -> str:
        """Description, then `fewshot` solved examples drawn with a seed fixed per (seed, task, example), then
        the prompt of example `index` (never shown as its own few-shot example)."""
        example = self.examples[index]
        shots: list[Example] = []
        if self.fewshot:
            pool = self.fewshot_pool or self.examples
            candidates = [e for e in pool if e is not example]
            shots = random.Random(f"{seed}:{self.name}:{index}").sample(candidates, self.fewshot)
        parts = [self.render(self.prompt, e, "prompt") + self.target_delimiter + self.target(e) for e in shots]
        parts.append(self.render(self.prompt, example, "prompt"))
        return self.description + self.fewshot_delimiter.join(parts)


@functools.cache
def _jinja() -> Any:
    """Sandboxed like transformers' chat templates; a missing field raises instead of rendering as ''."""
    from jinja2 import StrictUndefined
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    return ImmutableSandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True, autoescape=False)


@functools.lru_cache(maxsize=64)
def _template(text: str) -> Any:
    return _jinja().from_string(text)


def _field(task: Task, example: Example, name: str) -> Any:
    if name not in example.doc:
        raise DataError(f"{example.source}:{example.line}: field {name!r} missing (found keys: {sorted(example.doc)}); "
                        f"{task.where(_key_for(task, name))} names it")
    return example.doc[name]


def _key_for(task: Task, value: str) -> str:
    return next((k for k, v in task.options.items() if v == value), "data")


# ---- loading and validation -----------------------------------------------------------------------


def _yaml_mapping(path: Path) -> tuple[dict[str, Any], dict[str, int]]:
    """The YAML mapping and the line of each top-level key (PyYAML's nodes carry their position)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read task file ({e})") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        values = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 1
        raise ConfigError(f"{path}:{line}: malformed YAML ({getattr(e, 'problem', None) or e})") from None
    if not isinstance(node, yaml.MappingNode) or not isinstance(values, dict):
        raise ConfigError(f"{path}:1: a task file is a YAML mapping (kind: ..., data: ..., prompt: ...)")
    lines = {k.value: k.start_mark.line + 1 for k, _ in node.value if isinstance(k, yaml.ScalarNode)}
    return values, lines


def read_jsonl(path: Path) -> list[Example]:
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    examples = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line_no}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(doc, dict):
                raise DataError(f"{path}:{line_no}: expected a JSON object, got {type(doc).__name__}")
            examples.append(Example(doc, line_no, path))
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples


def check_metrics(kind: str, metrics: list[str], where: str, samples: int = 1) -> None:
    for name in metrics:
        match = _PASS_AT.match(name) if kind == "code" else None
        if kind == "retrieval" and _RECALL_AT.match(name):
            continue
        if match:
            if int(match.group(1)) > samples:
                raise ConfigError(f"{where}: {name} needs at least {match.group(1)} samples per problem "
                                  f"(samples: {samples})")
        elif name not in METRICS[kind]:
            raise ConfigError(f"{where}: unknown metric {name!r} for a {kind} task; known: "
                              f"{', '.join(METRICS[kind])}")


def load_task(path: str | Path) -> Task:
    """Read and validate a task file and its data; raises ConfigError/DataError naming file and line."""
    path = Path(path)
    spec, lines = _yaml_mapping(path)

    def at(key: str) -> str:
        return f"{path}:{lines.get(key, 1)}"

    kind = spec.get("kind")
    if kind not in KINDS:
        raise ConfigError(f"{at('kind')}: kind must be one of {', '.join(KINDS)} (got {kind!r})")
    allowed = COMMON | KIND_KEYS[kind]
    for key in spec:
        if key not in allowed:
            raise ConfigError(f"{at(str(key))}: unknown key {key!r} for a {kind} task; "
                              f"known: {', '.join(sorted(allowed))}")
    for key in ("data", "prompt", *REQUIRED[kind]):
        if key not in spec:
            raise ConfigError(f"{path}:1: a {kind} task needs {key!r}")
    for key in ("data", "prompt", "description", "fewshot_data", "fewshot_delimiter", "target_delimiter",
                "continuation", "references", "label", "tests", "answer", "documents", "sources", "encoder"):
        if key in spec and not isinstance(spec[key], str):
            raise ConfigError(f"{at(key)}: {key} must be a string, got {spec[key]!r}")
    if kind == "multiple_choice" and not isinstance(spec["choices"], (str, list)):
        raise ConfigError(f"{at('choices')}: choices is a field name or a list of strings")
    ints = {"fewshot": 0, "max_new_tokens": 1, "samples": 1, "memory_mb": 16, "k": 1}
    if spec.get("mode", "bm25") not in ("bm25", "dense", "hybrid"):
        raise ConfigError(f"{at('mode')}: mode must be bm25, dense or hybrid, got {spec['mode']!r}")
    for key, low in ints.items():
        if key in spec and (not isinstance(spec[key], int) or isinstance(spec[key], bool) or spec[key] < low):
            raise ConfigError(f"{at(key)}: {key} must be an integer >= {low}, got {spec[key]!r}")
    for key in ("temperature", "timeout"):
        if key in spec and (not isinstance(spec[key], (int, float)) or spec[key] < 0 or
                            (key == "timeout" and spec[key] == 0)):
            raise ConfigError(f"{at(key)}: {key} must be a positive number, got {spec[key]!r}")
    stop = spec.get("stop", ["x"])
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise ConfigError(f"{at('stop')}: stop must be a list of non-empty strings")
    metrics = spec.get("metrics", DEFAULT_METRICS[kind])
    if isinstance(metrics, str):
        metrics = [metrics]
    if not isinstance(metrics, list) or not metrics or not all(isinstance(m, str) for m in metrics):
        raise ConfigError(f"{at('metrics')}: metrics must be a non-empty list of names")
    check_metrics(kind, metrics, at("metrics"), spec.get("samples", 1))
    fewshot = spec.get("fewshot", 0)
    if fewshot and kind in ("classification", "code", "retrieval", "document_qa"):
        raise ConfigError(f"{at('fewshot')}: few-shot examples are not supported for {kind} tasks")
    options = {k: spec[k] for k in KIND_KEYS[kind] if k in spec}
    task = Task(path=path, name=str(spec.get("name", path.stem)), kind=kind, data=path.parent / spec["data"],
                prompt=spec["prompt"], metrics=list(metrics), options=options, lines=lines, fewshot=fewshot,
                fewshot_delimiter=spec.get("fewshot_delimiter", "\n\n"),
                target_delimiter=spec.get("target_delimiter", " "), description=spec.get("description", ""))
    _jinja_check(task, spec)
    task.examples = read_jsonl(task.data)
    if "fewshot_data" in spec:
        task.fewshot_data = path.parent / spec["fewshot_data"]
        task.fewshot_pool = read_jsonl(task.fewshot_data)
    pool = len(task.fewshot_pool) if task.fewshot_pool else len(task.examples) - 1
    if fewshot > pool:
        raise ConfigError(f"{at('fewshot')}: fewshot: {fewshot} but only {pool} other examples to draw from")
    for example in task.examples + task.fewshot_pool:  # every example's fields and answers, before any model runs
        task.render(task.prompt, example, "prompt")
        if kind == "multiple_choice":
            task.answer_index(example)
        elif kind == "loglikelihood" and not task.render(task.options["continuation"], example, "continuation"):
            raise DataError(f"{example.source}:{example.line}: the continuation is empty; there is nothing to score")
        elif kind in ("generation", "document_qa"):
            task.references(example)
        elif kind == "classification":
            task.label(example)
        elif kind == "code" and not str(_field(task, example, task.options["tests"])).strip():
            raise DataError(f"{example.source}:{example.line}: tests are empty; every program would pass")
    return task


def _jinja_check(task: Task, spec: dict[str, Any]) -> None:
    from jinja2 import TemplateSyntaxError

    for key in ("prompt", "continuation"):
        if key in spec:
            try:
                _jinja().parse(spec[key])
            except TemplateSyntaxError as e:
                raise ConfigError(f"{task.where(key)}: {key} template: {e.message}") from None


def find_tasks(paths: list[Path]) -> list[Path]:
    """Task files named directly, or every *.yaml / *.yml in a named folder (sorted, not recursive)."""
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml"))
            if not files:
                raise ConfigError(f"{path}: no task files (*.yaml) in this folder")
            found += files
        elif path.is_file():
            found.append(path)
        else:
            raise ConfigError(f"{path}: no such task file or folder")
    return found
