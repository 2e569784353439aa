"""`lmforge eval`: run tasks on a model and write every number with what produced it; `eval compare`.

A report is JSON: the model (path and a SHA-256 of its weight files), each task (file, SHA-256 of the
task file and its data, metrics, per-example details), the seed and the lmforge version — enough to
reproduce the number later. A Markdown table goes beside it, and a checkpoint directory's metrics.jsonl
gets one line so training curves and evaluations sit together.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import sys
import warnings
from pathlib import Path
from typing import Any, Literal

from lmforge.apps.answer import Reader, is_span_run
from lmforge.errors import ConfigError, DataError
from lmforge.eval.classifier import HeadClassifier, is_head_run
from lmforge.eval.harness import BOS_PREFIXES, Unsupported, run_task
from lmforge.eval.remote import RemoteLM, is_endpoint
from lmforge.eval.sandbox import check_isolation
from lmforge.eval.seq2seq import BASELINES as SEQ2SEQ_BASELINES
from lmforge.eval.seq2seq import TASKS as SEQ2SEQ_TASKS
from lmforge.eval.seq2seq import baseline as seq2seq_baseline
from lmforge.eval.seq2seq import evaluate_pairs
from lmforge.eval.tasks import find_tasks, load_task
from lmforge.io import atomic_write_json, atomic_write_text, check_output
from lmforge.options import Dtype, torch_dtype

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def file_sha256(*paths: Path) -> str:
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def path_sha256(path: Path) -> str:
    """A file's SHA-256, or for a folder that of its files' relative names and contents in sorted order."""
    if path.is_file():
        return file_sha256(path)
    h = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(file.relative_to(path)).encode() + b"\0" + file_sha256(file).encode())
    return h.hexdigest()


def model_provenance(model: Any, path: Path | None) -> dict[str, Any]:
    """Where the model came from: its directory and a hash of its weight files (sorted by name)."""
    info: dict[str, Any] = {"type": type(model).__name__}
    if path is not None:
        info["path"] = str(Path(path).resolve())
        weights = sorted(p for p in Path(path).iterdir() if p.suffix in WEIGHT_SUFFIXES and p.name != "train_state.pt")
        if weights:
            info["weights"] = [p.name for p in weights]
            info["weights_sha256"] = file_sha256(*weights)
        if (Path(path) / "tokenizer.json").exists():
            info["tokenizer_sha256"] = file_sha256(Path(path) / "tokenizer.json")
    return info


def evaluate(
    model: str | Path,
    tasks: list[Path] | Path | None = None,
    out: Path | None = None,
    *,
    task: str | None = None,
    data: Path | None = None,
    seed: int = 1234,
    batch_size: int = 8,
    device: str | None = None,
    unsafe_no_sandbox: bool = False,
    progress: bool = True,
    api_key: str | None = None,
    served_model: str | None = None,
    tokenizer: Path | None = None,
    concurrency: int = 8,
    cache: Path | None = None,
    bos_prefix: Literal["eos", "none", "model"] = "eos",
    num_beams: int | None = None,
    baselines: str | list[str] | None = None,
    max_new_tokens: int | None = None,
    dtype: Dtype | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Evaluate a model on task files (or held-out perplexity) and write a reproducible report.

    Args:
        model: Checkpoint directory, HF model directory, a `finetune classify` run (for classification
            tasks), or the base URL of an OpenAI-compatible endpoint (http://host:port/v1); from Python also
            a loaded LM or any object with `predict(texts)`.
        tasks: Task files (*.yaml) or folders of them.
        out: Report file (JSON); a Markdown table is written beside it (same name, .md).
        task: One more task: a task file, "perplexity" (with --data), or "translation" / "summarization" (with
            --data; the model may also be a baseline: copy, lead or dictionary).
        data: Held-out text for --task perplexity: a text file, folder, JSONL file or packed dataset; for
            translation / summarization: {"source", "target"} pairs (JSONL) or a pairs directory (its test.jsonl).
        seed: Seed for drawing few-shot examples and for sampling code completions.
        batch_size: Loglikelihood requests scored together.
        device: "cpu", "cuda", ...; default CUDA when present.
        unsafe_no_sandbox: Run generated code without bubblewrap's network and filesystem isolation (where
            `bwrap` is not installed). Only for code you would run yourself.
        progress: Show progress lines.
        api_key: Endpoints only: sent as `Authorization: Bearer`; default $LMFORGE_API_KEY or $OPENAI_API_KEY.
            Never written to the report or the cache.
        served_model: Endpoints only: the model id to evaluate (default: the one /v1/models lists).
        tokenizer: Endpoints only: the served model's tokenizer directory; prompts then go as token ids built
            as a local evaluation builds them, so an lmforge model scores the same over HTTP as from disk.
        concurrency: Endpoints only: requests in flight at once (429 / 5xx answers are retried with back-off).
        cache: Endpoints only: directory of cached answers, so a rerun does not pay twice
            (default ~/.cache/lmforge/remote).
        bos_prefix: What precedes each context in loglikelihood scoring: "eos" (an end-of-text token, or the
            tokenizer's BOS where it adds one: documents follow one another so in training), "none" (nothing,
            as lm-evaluation-harness's `hf` model by default: use it to reproduce published numbers) or
            "model" (the tokenizer's own BOS rule, as lm-evaluation-harness with add_bos_token=True).
        num_beams: Translation / summarization: beams for decoding (default: the model's generation_config).
        baselines: Translation / summarization: baselines scored on the same --data, as rows of the same
            table, comma-separated: copy, lead, dictionary (learned from the train.jsonl beside --data).
        max_new_tokens: Translation / summarization: most tokens generated per source (default: the model's
            generation_config).
        dtype: Cast a local model's weights ("float32" or "bfloat16"); default the checkpoint's own.
        overwrite: Replace the report at `out` (refused by default: a report may be the only record of a run).

    Returns:
        Each task's metrics and the report's path.
    """
    from lmforge.lm import LM, load

    if out is not None:
        check_output(out, overwrite)
        check_output(Path(out).with_suffix(".md"), overwrite, option="--out")
    if bos_prefix not in BOS_PREFIXES:
        raise ConfigError(f"--bos-prefix {bos_prefix}: expected one of {', '.join(BOS_PREFIXES)}")
    paths = find_tasks([tasks] if isinstance(tasks, (str, Path)) else list(tasks or []))
    data_task = task == "perplexity" or task in SEQ2SEQ_TASKS  # built-in tasks on --data, not task files
    if task is not None and not data_task:
        paths.append(Path(task))
    for name in _names(baselines):
        if task not in SEQ2SEQ_TASKS or name not in SEQ2SEQ_BASELINES:
            raise ConfigError(f"--baselines {name}: baselines go with --task translation / summarization and are "
                              f"{', '.join(SEQ2SEQ_BASELINES)}")
    if data_task and data is None:
        raise ConfigError(f"--task {task} needs --data (held-out {'text' if task == 'perplexity' else 'pairs'})")
    if data is not None and not data_task:
        raise ConfigError("--data is the held-out data of --task perplexity / translation / summarization; task "
                          "files name their own data")
    if not paths and not data_task:
        raise ConfigError("nothing to evaluate: give --tasks (files or folders) or --task perplexity --data FILE")
    loaded = [load_task(p) for p in paths]  # every task validated before the model loads
    if any(t.kind == "code" for t in loaded):  # refuse before hours of other tasks, not after
        check_isolation(not unsafe_no_sandbox)
    names = [t.name for t in loaded] + ([task] if data_task else [])
    if len(set(names)) != len(names):
        raise ConfigError(f"two tasks share a name: {sorted(n for n in names if names.count(n) > 1)}; "
                          "set `name:` in one of the files")
    remote = {"api_key": api_key, "served_model": served_model, "tokenizer": tokenizer, "concurrency": concurrency,
              "cache": cache}
    if not is_endpoint(model):
        given = [k for k, v in remote.items() if v != {"concurrency": 8}.get(k)]
        if given:
            raise ConfigError(f"--{given[0].replace('_', '-')} applies to an HTTP endpoint "
                              f"(--model http://host:port/v1), not {model}")
    model_path = None if isinstance(model, LM) or not isinstance(model, (str, Path)) or is_endpoint(model) \
        else Path(model)
    if is_endpoint(model):
        lm = RemoteLM(model, api_key=api_key, model=served_model, tokenizer=tokenizer, concurrency=concurrency,
                      cache=cache)
    elif model_path is None:
        lm = model
    elif task in SEQ2SEQ_TASKS and str(model) in SEQ2SEQ_BASELINES and not model_path.exists():
        lm, model_path = seq2seq_baseline(str(model), Path(data)), None
    elif is_span_run(model_path):  # a `finetune qa` run or HF BertForQuestionAnswering: document_qa tasks
        lm = Reader(model_path, "extractive", device)
    elif is_head_run(model_path):  # a `finetune classify` run: classification tasks only
        lm = HeadClassifier(model_path, device=device, batch_size=batch_size)
    else:
        lm = load(model_path, device=device, dtype=torch_dtype(dtype))
    if model_path is None:
        model_path = getattr(lm, "path", None)
    report: dict[str, Any] = {
        "lmforge_version": _version(), "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "model": lm.provenance() if isinstance(lm, RemoteLM) else model_provenance(lm, model_path), "seed": seed,
        "batch_size": batch_size, "bos_prefix": bos_prefix, "scoring_convention": BOS_PREFIXES[bos_prefix],
        "environment": {"python": platform.python_version(), "torch": _torch_version(),
                        "device": str(getattr(lm, "device", "n/a"))},
        "tasks": {}, "skipped": {},
    }
    if task == "perplexity":
        from lmforge.eval.perplexity import perplexity

        if isinstance(lm, RemoteLM):
            raise ConfigError("--task perplexity scores held-out text with a model on this machine; for an endpoint "
                              "use a loglikelihood task (its perplexity and bits_per_byte metrics)")
        if not isinstance(lm, LM):
            raise ConfigError(f"--task perplexity needs a language model; {model} is a classification head run")
        result = perplexity(lm, Path(data), batch_size=batch_size, progress=progress)
        report["tasks"]["perplexity"] = {
            "kind": "perplexity", "data": str(Path(data).resolve()),
            "data_sha256": path_sha256(Path(data)),
            "metrics": {k: result[k] for k in ("perplexity", "bits_per_byte", "nll")},
            "tokens": result["tokens"], "bytes": result["bytes"], "block_size": result["block_size"],
            "stride": result["stride"]}
    if task in SEQ2SEQ_TASKS:
        report["tasks"][task] = evaluate_pairs(lm, Path(data), task, num_beams=num_beams, batch_size=batch_size,
                                               max_new_tokens=max_new_tokens, progress=progress)
        for name in _names(baselines):
            report["tasks"][f"{task}[baseline:{name}]"] = evaluate_pairs(name, Path(data), task, progress=progress)
    for t in loaded:
        try:
            result = run_task(lm, t, seed=seed, batch_size=batch_size, isolate=not unsafe_no_sandbox,
                              progress=progress, bos_prefix=bos_prefix)
        except Unsupported as e:
            warnings.warn(f"{t.path}: skipped: {e}", stacklevel=2)
            report["skipped"][t.name] = {"file": str(t.path), "reason": str(e)}
            continue
        report["tasks"][t.name] = {"file": str(t.path.resolve()), "sha256": t.sha256(), **result}
    if not report["tasks"]:
        raise ConfigError("no task could run on this model: " +
                          "; ".join(f"{k}: {v['reason']}" for k, v in report["skipped"].items()))
    table = markdown(report)
    if out is not None:
        out = Path(out)
        atomic_write_json(out, report)
        atomic_write_text(out.with_suffix(".md"), table + "\n")
    if model_path is not None and _is_lmforge_run(Path(model_path)):
        append_metrics(Path(model_path), report, out)
    if progress:
        print(table, file=sys.stderr)
    summary: dict[str, Any] = {name: r["metrics"] for name, r in report["tasks"].items()}
    if report["skipped"]:
        summary["skipped"] = {k: v["reason"] for k, v in report["skipped"].items()}
    if out is not None:
        summary["out"] = str(out)
    return summary


def _is_lmforge_run(path: Path) -> bool:
    """An lmforge checkpoint directory gets the metrics line; an HF model folder is left as it is."""
    from lmforge.model.hf import is_hf_checkpoint

    return (path / "config.json").exists() and not is_hf_checkpoint(path)


def append_metrics(checkpoint: Path, report: dict[str, Any], out: Path | None) -> None:
    """One line in the run's metrics.jsonl at the weights' training step: {"step", "eval/TASK/METRIC": value}."""
    from lmforge.checkpoint import weights_step

    record: dict[str, Any] = {"event": "eval", "time": report["created"]}
    try:
        step = weights_step(checkpoint)
    except Exception:  # an HF directory may hold no lmforge step metadata
        step = None
    if step is not None:
        record["step"] = step
    for name, result in report["tasks"].items():
        for metric, value in result["metrics"].items():
            record[f"eval/{name}/{metric}"] = value
    if out is not None:
        record["report"] = str(Path(out).resolve())
    with open(checkpoint / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _names(values: str | list[str] | None) -> list[str]:
    items = values.split(",") if isinstance(values, str) else list(values or [])
    return [str(v).strip() for v in items if str(v).strip()]


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:.1f}"
    return str(value)


def markdown(report: dict[str, Any]) -> str:
    rows = ["| task | kind | metric | value | examples |", "|---|---|---|---:|---:|"]
    for name, result in report["tasks"].items():
        for metric, value in result["metrics"].items():
            rows.append(f"| {name} | {result['kind']} | {metric} | {_fmt(value)} | "
                        f"{result.get('examples', result.get('tokens', ''))} |")
    notes = [f"- {name}: {r['truncated']} prompts truncated from the left to fit the context"
             for name, r in report["tasks"].items() if r.get("truncated")]
    notes += [f"- {name}: skipped ({v['reason']})" for name, v in report.get("skipped", {}).items()]
    notes += list(dict.fromkeys(f"- {r['kind']} {metric}: {signature}" for r in report["tasks"].values()
                                for metric, signature in r.get("signatures", {}).items()))
    model = report["model"]
    head = [f"Model: `{model.get('path') or _endpoint_label(model) or model['type']}`" +
            (f" (weights sha256 {model['weights_sha256'][:12]})" if "weights_sha256" in model else "") +
            f", seed {report['seed']}, lmforge {report['lmforge_version']}", ""]
    if "bos_prefix" in report and any(r["kind"] in ("multiple_choice", "loglikelihood")
                                      for r in report["tasks"].values()):
        head[-1:] = [f"Loglikelihoods: --bos-prefix {report['bos_prefix']}: {report['scoring_convention']}.", ""]
    return "\n".join(head + rows + (["", *notes] if notes else []))


def _read_report(path: Path) -> dict[str, Any]:
    try:
        report = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: no such report") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not a JSON report ({e.msg})") from None
    if not isinstance(report, dict) or not isinstance(report.get("tasks"), dict):
        raise DataError(f"{path}: not an lmforge eval report (no 'tasks'); write one with `lmforge eval --out`")
    return report


def _endpoint_label(model: dict[str, Any]) -> str | None:
    return f"{model['url']} ({model.get('model_id', '?')})" if "url" in model else None


def compare(reports: list[Path] | Path, *more: Path) -> str:
    """Compare evaluation reports side by side, each with its change from the first (the baseline).

    `lmforge eval compare runs/ngram/eval.json runs/lstm/eval.json runs/demo/eval.json`; from Python
    `compare(a, b, c)` or `compare([a, b, c])`.

    Args:
        reports: Two or more reports (JSON written by `lmforge eval --out`), the baseline first.

    Returns:
        A Markdown table: task, metric, each report's value, and each later report's change from the first.
    """
    paths = [*(reports if isinstance(reports, (list, tuple)) else [reports]), *more]
    if len(paths) < 2:
        raise ConfigError(f"compare needs two or more reports; got {len(paths)}")
    loaded = [_read_report(Path(p)) for p in paths]
    names = [chr(ord("a") + i) if i < 26 else f"r{i + 1}" for i in range(len(paths))]
    rows = [f"{n}: {p} ({r['model'].get('path') or _endpoint_label(r['model']) or '?'})"
            for n, p, r in zip(names, paths, loaded)]
    deltas = [f"Δ ({n} − a)" for n in names[1:]]
    rows += ["", f"| task | metric | {' | '.join(names)} | {' | '.join(deltas)} |",
             "|---|---|" + "---:|" * (len(names) + len(deltas))]
    first = loaded[0]
    for name in dict.fromkeys(t for r in loaded for t in r["tasks"]):
        metrics = [r["tasks"].get(name, {}).get("metrics", {}) for r in loaded]
        for metric in dict.fromkeys(m for ms in metrics for m in ms):
            values = [ms.get(metric) for ms in metrics]
            cells = [_fmt(v) for v in values] + [_delta(values[0], v) for v in values[1:]]
            rows.append(f"| {name} | {metric} | {' | '.join(cells)} |")
    for n, report in zip(names[1:], loaded[1:]):
        for name in [t for t in first["tasks"] if t in report["tasks"]]:
            sa, sb = first["tasks"][name].get("sha256"), report["tasks"][name].get("sha256")
            if sa and sb and sa != sb:
                rows.append(f"\nnote: task {name} differs between a and {n} (its file or data changed)")
    seeds = [r.get("seed") for r in loaded]
    if len(set(seeds)) > 1:
        rows.append("\nnote: seeds differ (" + ", ".join(f"{n}: {s}" for n, s in zip(names, seeds)) + ")")
    return "\n".join(rows)


def _delta(base: Any, value: Any) -> str:
    if not (isinstance(base, (int, float)) and isinstance(value, (int, float))):
        return "—"
    delta = value - base
    return ("+" if delta > 0 else "") + _fmt(delta)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lmforge")
    except PackageNotFoundError:
        return "unknown"


def _torch_version() -> str:
    import torch

    return torch.__version__
