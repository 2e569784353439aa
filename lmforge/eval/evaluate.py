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
from typing import Any

from lmforge.errors import ConfigError, DataError
from lmforge.eval.classifier import HeadClassifier, is_head_run
from lmforge.eval.harness import Unsupported, run_task
from lmforge.eval.sandbox import check_isolation
from lmforge.eval.tasks import find_tasks, load_task
from lmforge.io import atomic_write_json, atomic_write_text

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
    model: Path,
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
) -> dict[str, Any]:
    """Evaluate a model on task files (or held-out perplexity) and write a reproducible report.

    Args:
        model: Checkpoint directory, HF model directory, or a `finetune classify` run (for classification
            tasks); from Python also a loaded LM or any object with `predict(texts)`.
        tasks: Task files (*.yaml) or folders of them.
        out: Report file (JSON); a Markdown table is written beside it (same name, .md).
        task: One more task: a task file, or "perplexity" (with --data).
        data: Held-out text for --task perplexity: a text file, folder, JSONL file or packed dataset.
        seed: Seed for drawing few-shot examples and for sampling code completions.
        batch_size: Loglikelihood requests scored together.
        device: "cpu", "cuda", ...; default CUDA when present.
        unsafe_no_sandbox: Run generated code without bubblewrap's network and filesystem isolation (where
            `bwrap` is not installed). Only for code you would run yourself.
        progress: Show progress lines.

    Returns:
        Each task's metrics and the report's path.
    """
    from lmforge.lm import LM, load

    paths = find_tasks([tasks] if isinstance(tasks, (str, Path)) else list(tasks or []))
    if task is not None and task != "perplexity":
        paths.append(Path(task))
    if task == "perplexity" and data is None:
        raise ConfigError("--task perplexity needs --data (held-out text)")
    if data is not None and task != "perplexity":
        raise ConfigError("--data is the held-out text for --task perplexity; task files name their own data")
    if not paths and task != "perplexity":
        raise ConfigError("nothing to evaluate: give --tasks (files or folders) or --task perplexity --data FILE")
    loaded = [load_task(p) for p in paths]  # every task validated before the model loads
    if any(t.kind == "code" for t in loaded):  # refuse before hours of other tasks, not after
        check_isolation(not unsafe_no_sandbox)
    names = [t.name for t in loaded] + (["perplexity"] if task == "perplexity" else [])
    if len(set(names)) != len(names):
        raise ConfigError(f"two tasks share a name: {sorted(n for n in names if names.count(n) > 1)}; "
                          "set `name:` in one of the files")
    model_path = None if isinstance(model, LM) or not isinstance(model, (str, Path)) else Path(model)
    if model_path is None:
        lm = model
    elif is_head_run(model_path):  # a `finetune classify` run: classification tasks only
        lm = HeadClassifier(model_path, device=device, batch_size=batch_size)
    else:
        lm = load(model_path, device=device)
    if model_path is None:
        model_path = getattr(lm, "path", None)
    report: dict[str, Any] = {
        "lmforge_version": _version(), "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "model": model_provenance(lm, model_path), "seed": seed, "batch_size": batch_size,
        "environment": {"python": platform.python_version(), "torch": _torch_version(),
                        "device": str(getattr(lm, "device", "n/a"))},
        "tasks": {}, "skipped": {},
    }
    if task == "perplexity":
        from lmforge.eval.perplexity import perplexity

        if not isinstance(lm, LM):
            raise ConfigError(f"--task perplexity needs a language model; {model} is a classification head run")
        result = perplexity(lm, Path(data), batch_size=batch_size, progress=progress)
        report["tasks"]["perplexity"] = {
            "kind": "perplexity", "data": str(Path(data).resolve()),
            "data_sha256": path_sha256(Path(data)),
            "metrics": {k: result[k] for k in ("perplexity", "bits_per_byte", "nll")},
            "tokens": result["tokens"], "bytes": result["bytes"], "block_size": result["block_size"],
            "stride": result["stride"]}
    for t in loaded:
        try:
            result = run_task(lm, t, seed=seed, batch_size=batch_size, isolate=not unsafe_no_sandbox,
                              progress=progress)
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
    model = report["model"]
    head = [f"Model: `{model.get('path', model['type'])}`" +
            (f" (weights sha256 {model['weights_sha256'][:12]})" if "weights_sha256" in model else "") +
            f", seed {report['seed']}, lmforge {report['lmforge_version']}", ""]
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


def compare(a: Path, b: Path) -> str:
    """Compare two evaluation reports side by side, with the change from the first to the second.

    Args:
        a: The baseline report (JSON written by `lmforge eval --out`).
        b: The report to compare with it.

    Returns:
        A Markdown table: task, metric, a, b, b − a.
    """
    ra, rb = _read_report(a), _read_report(b)
    rows = [f"a: {a} ({ra['model'].get('path', '?')})", f"b: {b} ({rb['model'].get('path', '?')})", "",
            "| task | metric | a | b | Δ (b − a) |", "|---|---|---:|---:|---:|"]
    for name in dict.fromkeys([*ra["tasks"], *rb["tasks"]]):
        ma = ra["tasks"].get(name, {}).get("metrics", {})
        mb = rb["tasks"].get(name, {}).get("metrics", {})
        for metric in dict.fromkeys([*ma, *mb]):
            va, vb = ma.get(metric), mb.get(metric)
            delta = vb - va if isinstance(va, (int, float)) and isinstance(vb, (int, float)) else None
            sign = "+" if delta is not None and delta > 0 else ""
            rows.append(f"| {name} | {metric} | {_fmt(va)} | {_fmt(vb)} | "
                        f"{sign + _fmt(delta) if delta is not None else '—'} |")
    for name in [n for n in ra["tasks"] if n in rb["tasks"]]:
        sa, sb = ra["tasks"][name].get("sha256"), rb["tasks"][name].get("sha256")
        if sa and sb and sa != sb:
            rows.append(f"\nnote: task {name} differs between the reports (its file or data changed)")
    if ra.get("seed") != rb.get("seed"):
        rows.append(f"\nnote: seeds differ (a: {ra.get('seed')}, b: {rb.get('seed')})")
    return "\n".join(rows)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lmforge")
    except PackageNotFoundError:
        return "unknown"


def _torch_version() -> str:
    import torch

    return torch.__version__
