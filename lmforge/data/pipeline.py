"""`lmforge data clean` and `lmforge data dedup`: the per-document steps run over shards, in parallel.

Each input file is one shard. A run has three phases:
  1. map (parallel): read a shard, clean it, write a work shard plus its dedup keys (hashes, MinHash
     signatures, line hashes) and its tally;
  2. decide (serial, in shard order): which documents duplicate an earlier one, corpus-wide;
  3. finalize (parallel): write each output shard without the duplicates, atomically.
Shard i of the output depends only on the inputs and settings, never on worker count or executor, so
`--workers 1`, `--workers 8` and `--executor ray` write identical bytes. Every phase-1 result and output
shard is written atomically, so `--resume` after a crash skips what is finished.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import shutil
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import numpy as np

from lmforge.data.clean import FILTERS, NORMALIZE, Normalize, Preset, Tally, iter_clean, preset_settings
from lmforge.data.dedup import NearDuplicates, drop_units, exact_key, minhash_signature, unit_hashes
from lmforge.data.filters import Filters
from lmforge.data.readers import BadBytes, OnError, ShardWriter, Skip, TextUnit, input_files, read_file, read_shard
from lmforge.errors import ConfigError, DataError
from lmforge.io import atomic_path, atomic_write_json, remove_stale_temps
from lmforge.progress import Progress

Executor = Literal["local", "ray"]
WORK = ".work"
FORMAT = "lmforge-shards/1"


def shard_name(i: int, compress: bool) -> str:
    return f"part-{i:05d}.jsonl" + (".zst" if compress else "")


def run_tasks(fn: Callable[[dict], dict], tasks: Sequence[dict], *, workers: int = 1, executor: Executor = "local",
              desc: str = "shards", progress: bool = True) -> list[dict]:
    """`[fn(t) for t in tasks]` on `workers` local processes or a Ray cluster; results in task order."""
    if workers < 1:
        raise ConfigError(f"workers must be ≥ 1, got {workers}")
    bar = Progress(len(tasks), desc, unit="shards", enabled=progress and bool(tasks))
    results: list[dict] = []
    if executor == "ray":
        results = _run_ray(fn, tasks, workers, bar)
    elif executor != "local":
        raise ConfigError(f"executor must be 'local' or 'ray', got {executor!r}")
    elif workers == 1 or len(tasks) <= 1:
        for t in tasks:
            results.append(fn(t))
            bar.update(len(results))
    else:
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        with mp.get_context(method).Pool(min(workers, len(tasks))) as pool:
            for r in pool.imap(fn, tasks):
                results.append(r)
                bar.update(len(results))
    if tasks:
        bar.close()
    return results


def _run_ray(fn: Callable[[dict], dict], tasks: Sequence[dict], workers: int, bar: Progress) -> list[dict]:
    try:
        import ray
    except ImportError:
        raise ConfigError("--executor ray needs Ray: pip install 'lmforge[ray]'") from None
    if not ray.is_initialized():
        # Joins the cluster named by RAY_ADDRESS when set; otherwise starts a local one with `workers` CPUs.
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no phoning home from offline machines
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    remote = ray.remote(num_cpus=1)(fn)
    refs = [remote.remote(t) for t in tasks]
    results = []
    for ref in refs:
        results.append(ray.get(ref))
        bar.update(len(results))
    return results


def _settings_hash(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _prepare(output: Path, settings: dict[str, Any], resume: bool, overwrite: bool = False) -> Path | None:
    """Create `output`/.work; on resume, check the settings match. None when the run already finished.

    A failed run never blocks its retry: the message names both ways on, --resume with the same settings
    or --overwrite to start over.
    """
    output = Path(output)
    work = output / WORK
    plan = work / "plan.json"
    if overwrite and output.is_dir() and any(output.iterdir()):
        shutil.rmtree(output)
    if (output / "manifest.json").exists():
        if resume:
            return None
        raise DataError(f"{output}: already holds a finished run (manifest.json); choose another --out "
                        "or pass --overwrite to replace it")
    if output.exists() and any(output.iterdir()):
        if not plan.exists():
            raise DataError(f"{output}: not empty and not a run of this verb; choose another --out "
                            "or pass --overwrite to replace its contents")
        if json.loads(plan.read_text())["hash"] != _settings_hash(settings):
            raise DataError(f"{output}: holds an unfinished run started with other inputs or settings ({plan}); "
                            "rerun with those to continue it, or pass --overwrite to start over")
        if not resume:
            raise DataError(f"{output}: holds an unfinished run with these settings; pass --resume true to "
                            "continue it, or --overwrite to start over")
    work.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(work)
    remove_stale_temps(output)
    atomic_write_json(plan, {"hash": _settings_hash(settings), "settings": settings})
    return work


def _write_skips(path: Path, skips: list[Skip]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for s in skips:
            f.write(json.dumps(s.as_row(), ensure_ascii=False) + "\n")


def _map_clean(task: dict) -> dict:
    """Phase 1 of `clean` for one shard: work shard, exact keys, skip log, tally (written last: the marker)."""
    work, i = Path(task["work"]), task["index"]
    done = work / f"part-{i:05d}.tally.json"
    if done.exists():
        return json.loads(done.read_text())
    tally, skips, notes = Tally(), [], []
    records = read_file(Path(task["path"]), task["name"], text_field=task["text_field"], text_unit=task["text_unit"],
                        on_error=task["on_error"], bad_bytes=task["bad_bytes"], notes=notes)
    keys, ids = [], []
    with ShardWriter(work / shard_name(i, False)) as out:
        for doc in iter_clean(records, tally, normalize=Normalize(**task["normalize"]),
                              filters=Filters(**task["filters"]), pii=task["pii"], stopwords=task["stopwords"],
                              skips=skips):
            keys.append(exact_key(doc["text"]))
            ids.append(doc["id"])
            out.write(doc)
    with atomic_path(work / f"part-{i:05d}.ids.json") as tmp:
        tmp.write_text(json.dumps(ids, ensure_ascii=False), encoding="utf-8")
    tally.replaced_bytes = len(notes)
    _write_skips(work / f"part-{i:05d}.skips.jsonl", skips + notes)
    with atomic_path(work / f"part-{i:05d}.keys.npy") as tmp, open(tmp, "wb") as f:
        np.save(f, np.array(keys, dtype=np.uint64))
    result = {"tally": tally.as_dict()}
    atomic_write_json(done, result)
    return result


def _finalize(task: dict) -> dict:
    """Phase 3: copy a work (or input) shard to the output without the dropped documents, atomically."""
    out_path = Path(task["output"]) / shard_name(task["index"], task["compress"])
    marker = Path(task["work"]) / f"part-{task['index']:05d}.final.json"
    if out_path.exists() and marker.exists():  # written whole by an earlier, interrupted run
        return json.loads(marker.read_text())
    drops: dict[int, str] = {int(k): v for k, v in task["drops"].items()}
    source = Path(task["source"])
    boiler = frozenset(task.get("boilerplate", ()))
    removed: dict[str, int] = _count(drops.values())
    if task["from_work"] and not boiler:
        # Work shards are already JSONL: copy kept lines as bytes, no JSON parsing (half of phase 3's time).
        with ShardWriter(out_path, task["compress"]) as out, open(source, "rb") as lines:
            for j, line in enumerate(lines):
                if j not in drops:
                    out.write_line(line)
        result = {"file": out_path.name, "removed": removed}
        atomic_write_json(marker, result)
        return result
    rows = read_shard(source) if task["from_work"] else (
        r for r in read_file(source, task["name"], text_field=task["text_field"], text_unit=task["text_unit"],
                             on_error="skip", bad_bytes=task["bad_bytes"]) if not isinstance(r, Skip))
    with ShardWriter(out_path, task["compress"]) as out:
        for j, row in enumerate(rows):
            if j in drops:
                continue
            if boiler:
                row["text"] = drop_units(row["text"], task["unit"], boiler)
                if not row["text"]:
                    removed["boilerplate"] = removed.get("boilerplate", 0) + 1
                    continue
            out.write(row)
    result = {"file": out_path.name, "removed": removed}
    atomic_write_json(marker, result)
    return result


def _count(values: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return counts


def _finish(output: Path, work: Path, kind: str, tasks: list[dict], tally: Tally, finals: list[dict],
            settings: dict, clusters: dict[str, list[str]]) -> dict[str, Any]:
    for f in finals:
        tally.removed.update(f["removed"])
        tally.kept -= sum(f["removed"].values())
    if not tally.balanced():
        raise RuntimeError(f"accounting bug: {tally.as_dict()}")  # a bug in lmforge, never in the input
    skips = []
    for t in tasks:
        p = work / f"part-{t['index']:05d}.skips.jsonl"
        if p.exists():
            skips += [line for line in p.read_text(encoding="utf-8").splitlines() if line]
    with atomic_path(output / "skipped.jsonl") as tmp:
        tmp.write_text("".join(s + "\n" for s in skips), encoding="utf-8")
    with atomic_path(output / "clusters.jsonl") as tmp, open(tmp, "w", encoding="utf-8") as f:
        for kept, removed in clusters.items():
            f.write(json.dumps({"kept": kept, "removed": removed}, ensure_ascii=False) + "\n")
    shards = []
    for t, f in zip(tasks, finals):
        path = output / f["file"]
        shards.append({"file": f["file"], "source": t["name"], "bytes": path.stat().st_size})
    manifest = {"format": FORMAT, "stage": kind, "counts": tally.as_dict(), "shards": shards, "settings": settings}
    atomic_write_json(output / "manifest.json", manifest)
    shutil.rmtree(work, ignore_errors=True)
    return {"output": str(output), **tally.as_dict()}


def _tasks(input: Path | Sequence[Path], glob: str | None, common: dict) -> list[dict]:
    files = input_files(input, glob)
    return [{"index": i, "path": str(p), "name": name, **common} for i, (p, name) in enumerate(files)]


def clean(
    data: Path,
    out: Path,
    *,
    text_field: str = "text",
    text_unit: TextUnit = "file",
    glob: str | None = None,
    preset: Preset = "prose",
    normalize: Normalize = NORMALIZE,
    filters: Filters = FILTERS,
    pii: bool | None = None,
    exact_dedup: bool = True,
    stopwords: bool = False,
    compress: bool = False,
    workers: int = 1,
    executor: Executor = "local",
    resume: bool = False,
    overwrite: bool = False,
    on_error: OnError = "raise",
    bad_bytes: BadBytes = "replace",
    progress: bool = True,
) -> dict[str, Any]:
    """Clean a corpus: normalise, filter (Gopher rules, language), scrub PII, drop exact duplicates.

    Reads text, JSONL, CSV or Parquet files (also .gz/.zst), a file or a folder; writes one JSONL shard
    per input file, manifest.json (counts of kept, removed-by-rule and skipped documents), skipped.jsonl
    (every skipped line and why) and clusters.jsonl (each kept document with the exact copies removed).

    Args:
        data: A file, or a folder searched recursively.
        out: Folder for the shards; created, or continued with `resume`.
        text_field: JSONL key / CSV or Parquet column holding the text.
        text_unit: For plain-text files: one document per "file" or per blank-line "paragraph" block.
        glob: Only files under a folder whose relative path matches this pattern (e.g. "**/*.jsonl.gz").
        preset: "prose" (normalise, filter, scrub PII) or "code": every text kept byte-identical (no
            normalisation, no quality filters, no PII scrub; exact duplicates still dropped). Options given
            with a preset override it: `--preset code --pii true` scrubs PII and changes nothing else.
        normalize: Text normalisation steps.
        filters: Quality filter thresholds; `--filters.enabled false` keeps every document (but still
            normalises it: use `--preset code` for code).
        pii: Replace emails, phone numbers, IP addresses and card numbers with placeholders (default: on for
            prose, off for code).
        exact_dedup: Drop documents whose normalised text appeared earlier in the corpus.
        stopwords: Replace each text with its words minus stopwords (for classic NLP, not for LM training).
        compress: Write .jsonl.zst shards.
        workers: Processes (or Ray tasks) working on shards at once.
        executor: "local" processes or a "ray" cluster (RAY_ADDRESS, else a local one); same output.
        resume: Continue an interrupted run in `out`, skipping finished shards.
        overwrite: Delete what `out` holds and start over.
        on_error: "raise" at the first malformed line, or "skip" it and log it in skipped.jsonl.
        bad_bytes: Undecodable bytes: "replace" with U+FFFD (logged), "skip" the document, or "raise".
        progress: Show a progress line.

    Returns:
        The counts from manifest.json and the output folder.
    """
    output = Path(out)
    normalize, filters, pii = preset_settings(preset, normalize, filters, pii)
    common = {"text_field": text_field, "text_unit": text_unit, "normalize": asdict(normalize),
              "filters": asdict(filters), "pii": pii, "stopwords": stopwords, "on_error": on_error,
              "bad_bytes": bad_bytes}
    tasks = _tasks(data, glob, common)
    settings = {**common, "preset": preset, "exact_dedup": exact_dedup, "compress": compress,
                "inputs": [(t["path"], t["name"]) for t in tasks]}
    work = _prepare(output, settings, resume, overwrite)
    if work is None:
        return {"output": str(output), **json.loads((output / "manifest.json").read_text())["counts"]}
    for t in tasks:
        t["work"] = str(work)
    mapped = run_tasks(_map_clean, tasks, workers=workers, executor=executor, desc="clean", progress=progress)
    tally = Tally()
    for m in mapped:
        tally.add(m["tally"])
    drops, clusters = _decide(work, tasks, exact=exact_dedup)
    finals = run_tasks(_finalize, [
        {"index": t["index"], "work": str(work), "output": str(output), "compress": compress,
         "drops": drops[t["index"]],
         "source": str(work / shard_name(t["index"], False)), "from_work": True} for t in tasks],
        workers=workers, executor=executor, desc="write", progress=progress)
    return _finish(output, work, "clean", tasks, tally, finals, settings, clusters)


def _decide(work: Path, tasks: list[dict], *, exact: bool, near: float | None = None, num_perm: int = 128,
            ) -> tuple[list[dict[int, str]], dict[str, list[str]]]:
    """Phase 2: per shard, {document index: rule} of the duplicates; and clusters {kept id: removed ids}."""
    seen: dict[int, tuple[int, int]] = {}
    index = NearDuplicates(near, num_perm) if near is not None else None
    drops: list[dict[int, str]] = []
    clusters: dict[str, list[str]] = defaultdict(list)
    shard_ids = [json.loads((work / f"part-{t['index']:05d}.ids.json").read_text(encoding="utf-8")) for t in tasks]
    for t in tasks:
        i = t["index"]
        keys = np.load(work / f"part-{i:05d}.keys.npy")
        sigs = np.load(work / f"part-{i:05d}.sigs.npy", mmap_mode="r") if index is not None else None
        d: dict[int, str] = {}
        for j, key in enumerate(keys.tolist()):
            if exact and key in seen:
                a, b = seen[key]
                d[j] = "exact_duplicate"
                clusters[shard_ids[a][b]].append(shard_ids[i][j])
                continue
            seen.setdefault(key, (i, j))
            if index is not None and sigs is not None:
                dup = index.check((i, j), np.asarray(sigs[j]))
                if dup is not None:
                    d[j] = "near_duplicate"
                    clusters[shard_ids[dup[0]][dup[1]]].append(shard_ids[i][j])
        drops.append(d)
    return drops, dict(clusters)


def _map_dedup(task: dict) -> dict:
    """Phase 1 of `dedup` for one shard: exact keys, MinHash signatures, boilerplate unit hashes, ids."""
    work, i = Path(task["work"]), task["index"]
    done = work / f"part-{i:05d}.tally.json"
    if done.exists():
        return json.loads(done.read_text())
    tally, skips, notes = Tally(), [], []
    keys, sigs, ids, units = [], [], [], []
    for rec in read_file(Path(task["path"]), task["name"], text_field=task["text_field"],
                         text_unit=task["text_unit"], on_error=task["on_error"], bad_bytes=task["bad_bytes"],
                         notes=notes):
        tally.documents += 1
        if isinstance(rec, Skip):
            tally.skipped[rec.reason] += 1
            skips.append(rec)
            continue
        tally.kept += 1
        ids.append(rec["id"])
        keys.append(exact_key(rec["text"]))
        if task["near"] is not None:
            sigs.append(minhash_signature(rec["text"], task["num_perm"], task["shingle"]))
        if task["boilerplate"] != "off":
            units.extend(unit_hashes(rec["text"], task["boilerplate"]))
    tally.replaced_bytes = len(notes)
    _write_skips(work / f"part-{i:05d}.skips.jsonl", skips + notes)
    arrays = {"keys": np.array(keys, dtype=np.uint64),
              "sigs": np.array(sigs, dtype=np.uint32).reshape(len(sigs), task["num_perm"]),
              "units": np.unique(np.array(units, dtype=np.uint64), return_counts=True)}
    for name, arr in arrays.items():
        with atomic_path(work / f"part-{i:05d}.{name}.npy") as tmp, open(tmp, "wb") as f:
            np.save(f, np.stack([arr[0], arr[1].astype(np.uint64)]) if name == "units" else arr)
    with atomic_path(work / f"part-{i:05d}.ids.json") as tmp:
        tmp.write_text(json.dumps(ids, ensure_ascii=False), encoding="utf-8")
    result = {"tally": tally.as_dict()}
    atomic_write_json(done, result)
    return result


def dedup(
    data: Path,
    out: Path,
    *,
    near_threshold: float | None = 0.8,
    exact: bool = True,
    num_perm: int = 128,
    shingle: int = 5,
    boilerplate: Literal["off", "line", "paragraph"] = "off",
    boilerplate_min_docs: int = 3,
    text_field: str = "text",
    text_unit: TextUnit = "file",
    glob: str | None = None,
    compress: bool = False,
    workers: int = 1,
    executor: Executor = "local",
    resume: bool = False,
    overwrite: bool = False,
    on_error: OnError = "raise",
    bad_bytes: BadBytes = "replace",
    progress: bool = True,
) -> dict[str, Any]:
    """Remove exact and near-duplicate documents (MinHash + LSH) and, optionally, boilerplate lines.

    The first document of each duplicate cluster, in corpus order, is kept; clusters.jsonl lists each
    kept id with the ids removed as its copies, and manifest.json counts removals by rule.

    Args:
        data: A file or folder (typically the output of `lmforge data clean`).
        out: Folder for the deduplicated shards.
        near_threshold: Estimated Jaccard similarity of shingle sets at which two documents are near
            duplicates; null turns near dedup off.
        exact: Also drop exact duplicates (case and whitespace folded).
        num_perm: MinHash permutations; more is more precise and slower.
        shingle: Words per shingle.
        boilerplate: Remove each "line" or "paragraph" that appears in at least `boilerplate_min_docs`
            documents (navigation, licence headers); documents left empty are removed.
        boilerplate_min_docs: Document count at which a repeated line/paragraph counts as boilerplate.
        text_field: JSONL key / CSV or Parquet column holding the text.
        text_unit: For plain-text files: one document per "file" or per blank-line "paragraph" block.
        glob: Only files under a folder whose relative path matches this pattern.
        compress: Write .jsonl.zst shards.
        workers: Processes (or Ray tasks) working on shards at once.
        executor: "local" processes or a "ray" cluster; same output.
        resume: Continue an interrupted run in `out`, skipping finished shards.
        overwrite: Delete what `out` holds and start over.
        on_error: "raise" at the first malformed line, or "skip" it and log it in skipped.jsonl.
        bad_bytes: Undecodable bytes: "replace" with U+FFFD (logged), "skip" the document, or "raise".
        progress: Show a progress line.

    Returns:
        The counts from manifest.json and the output folder.
    """
    if near_threshold is not None and not 0 < near_threshold <= 1:
        raise ConfigError(f"near_threshold must be in (0, 1], got {near_threshold}")
    output = Path(out)
    common = {"text_field": text_field, "text_unit": text_unit, "on_error": on_error, "bad_bytes": bad_bytes,
              "near": near_threshold, "num_perm": num_perm, "shingle": shingle, "boilerplate": boilerplate}
    tasks = _tasks(data, glob, common)
    settings = {**common, "exact": exact, "compress": compress, "boilerplate_min_docs": boilerplate_min_docs,
                "inputs": [(t["path"], t["name"]) for t in tasks]}
    work = _prepare(output, settings, resume, overwrite)
    if work is None:
        return {"output": str(output), **json.loads((output / "manifest.json").read_text())["counts"]}
    for t in tasks:
        t["work"] = str(work)
    mapped = run_tasks(_map_dedup, tasks, workers=workers, executor=executor, desc="dedup", progress=progress)
    tally = Tally()
    for m in mapped:
        tally.add(m["tally"])
    drops, clusters = _decide(work, tasks, exact=exact, near=near_threshold, num_perm=num_perm)
    boiler: list[int] = []
    if boilerplate != "off":
        parts = [np.load(work / f"part-{t['index']:05d}.units.npy") for t in tasks]
        hashes = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.uint64)
        counts = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int64)
        uniq, inverse = np.unique(hashes, return_inverse=True)
        totals = np.bincount(inverse, weights=counts, minlength=len(uniq))
        boiler = uniq[totals >= boilerplate_min_docs].tolist()
    finals = run_tasks(_finalize, [
        {**t, "output": str(output), "compress": compress, "drops": drops[t["index"]], "source": t["path"],
         "from_work": False, "boilerplate": boiler, "unit": boilerplate} for t in tasks],
        workers=workers, executor=executor, desc="write", progress=progress)
    return _finish(output, work, "dedup", tasks, tally, finals, settings, clusters)
