"""Score a model on a task: loglikelihoods of continuations, generations, classifier predictions, or code run.

Loglikelihood scoring follows lm-evaluation-harness (Gao et al. 2021): the context's trailing whitespace
moves to the continuation, the continuation's tokens are those of encode(context + continuation) after
encode(context), and the score is Σ log p(continuation token | everything before it). Requests run in
batches, longest first, right-padded: with a causal mask later positions never affect earlier ones, so
padding cannot change a score. A context longer than the model's window is cut from the left, counted,
and reported once per task.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from lmforge.errors import ConfigError, DataError
from lmforge.eval import metrics as M
from lmforge.eval.qa import run_document_qa, run_retrieval
from lmforge.eval.sandbox import Limits, check_isolation, run_python
from lmforge.eval.tasks import CODE_STOP, Example, Task, Unsupported
from lmforge.progress import Progress

if TYPE_CHECKING:
    from lmforge.lm import LM


@runtime_checkable
class Classifier(Protocol):
    """A model with a classification head: for each text, the predicted label and each label's probability.

    `predict` receives all of a task's texts at once and batches them itself (a head run reloads per call).
    """

    def predict(self, texts: list[str]) -> list[tuple[str, dict[str, float]]]: ...


@dataclass
class Score:
    loglikelihood: float  # Σ log p(continuation tokens), nats
    greedy: bool  # every continuation token is the argmax at its position
    tokens: int  # continuation tokens scored
    truncated: bool  # the context was cut from the left to fit the model's window



BosPrefix = Literal["eos", "none", "model"]
BOS_PREFIXES: dict[str, str] = {  # the convention, in the words the report states it
    "eos": "each context follows an end-of-text token (the tokenizer's BOS where it adds one), as documents "
           "follow one another in training",
    "none": "contexts are scored with nothing before them, as lm-evaluation-harness's `hf` model does by default "
            "(an empty context gets end-of-text)",
    "model": "contexts start as the tokenizer itself starts a text (BOS where its rule adds one, else nothing), "
             "as lm-evaluation-harness with add_bos_token=True",
}


def encode_pair(lm: LM, context: str, continuation: str, bos_prefix: BosPrefix = "eos"
                ) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-evaluation-harness splits them, with `bos_prefix` deciding what
    comes before the context (see BOS_PREFIXES). Under "eos" the first continuation token is conditioned on
    something, as in training; "none" reproduces lm-evaluation-harness's published numbers."""
    if bos_prefix not in BOS_PREFIXES:
        raise ConfigError(f"bos_prefix={bos_prefix!r}: expected one of {sorted(BOS_PREFIXES)}")
    tok = lm.tokenizer
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    add_bos = False if bos_prefix == "none" else None  # None: the tokenizer's own rule
    ctx = tok.encode(context, add_bos=add_bos)
    cont = tok.encode(context + continuation, add_bos=add_bos)[len(ctx):]
    starts_with_bos = tok.bos_id is not None and ctx[:1] == [tok.bos_id]
    if (bos_prefix == "eos" and not starts_with_bos) or not ctx:
        ctx = [tok.eos_id, *ctx]
    return ctx, cont


def check_pair(lm: LM, task: Task, example: Example, pair: tuple[list[int], list[int]]) -> tuple[list[int], list[int]]:
    """A continuation must have tokens to score and fit the context with at least one token before it."""
    window = lm.config.max_position_embeddings
    if not pair[1]:
        raise DataError(f"{example.source}:{example.line}: the continuation encodes to no tokens; nothing to score")
    if len(pair[1]) > window:
        raise DataError(f"{example.source}:{example.line}: a continuation of {len(pair[1])} tokens is longer than the "
                        f"model's context ({window}); it cannot be scored")
    return pair


@torch.no_grad()
def score_pairs(lm: LM, pairs: Sequence[tuple[list[int], list[int]]], *, batch_size: int = 8,
                progress: Progress | None = None) -> list[Score]:
    """Loglikelihood of each continuation given its context, batched longest first."""
    window = lm.config.max_position_embeddings
    inputs, truncated = [], []
    for ctx, cont in pairs:
        if not 0 < len(cont) <= window:
            raise ValueError(f"continuation of {len(cont)} tokens; check_pair lets only 1..{window} through")
        ids = (ctx + cont)[:-1]
        truncated.append(len(ids) > window)
        inputs.append(ids[-window:])
    order = sorted(range(len(pairs)), key=lambda i: -len(inputs[i]))
    scores: list[Score | None] = [None] * len(pairs)
    device = lm.device
    lm.model.eval()
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        length = max(len(inputs[i]) for i in batch)
        x = torch.zeros(len(batch), length, dtype=torch.long)
        for row, i in enumerate(batch):
            x[row, :len(inputs[i])] = torch.tensor(inputs[i])
        logits = lm.model(x.to(device))
        for row, i in enumerate(batch):
            cont = pairs[i][1]
            end = len(inputs[i])
            # Only the continuation's positions: log_softmax over [n_cont, vocab], not the whole batch.
            logp = F.log_softmax(logits[row, end - len(cont):end].double(), dim=-1)
            target = torch.tensor(cont, device=logp.device)
            values = logp.gather(-1, target[:, None])[:, 0]
            greedy = bool((logp.argmax(-1) == target).all())
            scores[i] = Score(float(values.sum()), greedy, len(cont), truncated[i])
        if progress is not None:
            progress.update(progress.done + len(batch))
    return scores  # type: ignore[return-value]


def loglikelihoods(lm: Any, task: Task, requests: list[tuple[Example, str, str]], *, batch_size: int,
                   bar: Progress, bos_prefix: BosPrefix = "eos") -> list[Score]:
    """Score each (example, context, continuation): a local model in batches through `score_pairs`; a model
    with its own `loglikelihoods` (an HTTP endpoint, `lmforge.eval.remote`) through that."""
    if hasattr(lm, "loglikelihoods"):
        return lm.loglikelihoods(task, requests, progress=bar, bos_prefix=bos_prefix)
    pairs = [check_pair(lm, task, e, encode_pair(lm, context, continuation, bos_prefix))
             for e, context, continuation in requests]
    return score_pairs(lm, pairs, batch_size=batch_size, progress=bar)


def _warn_truncated(task: Task, count: int, total: int, window: int) -> None:
    if count:
        warnings.warn(f"{task.path}: {count} of {total} prompts were longer than the model's context "
                      f"({window} tokens) and were truncated from the left", stacklevel=3)


def run_multiple_choice(lm: LM, task: Task, contexts: list[str], *, batch_size: int, bar: Progress,
                        bos_prefix: BosPrefix = "eos") -> dict:
    """acc: the choice with the highest loglikelihood is the answer; acc_norm: the same after dividing each
    loglikelihood by the choice's length in characters, as lm-evaluation-harness does (`len(choice)`)."""
    requests, starts = [], []
    for example, context in zip(task.examples, contexts):
        starts.append(len(requests))
        requests += [(example, context, task.target_delimiter + choice) for choice in task.choices(example)]
    scores = loglikelihoods(lm, task, requests, batch_size=batch_size, bar=bar, bos_prefix=bos_prefix)
    details, acc, acc_norm, truncated = [], [], [], 0
    for i, example in enumerate(task.examples):
        choices = task.choices(example)
        own = scores[starts[i]:starts[i] + len(choices)]
        lls = [s.loglikelihood for s in own]
        truncated += any(s.truncated for s in own)
        gold = task.answer_index(example)
        pred = max(range(len(lls)), key=lambda j: (lls[j], -j))  # first of equal maxima, like np.argmax
        normed = [ll / len(c) for ll, c in zip(lls, choices)]
        pred_norm = max(range(len(normed)), key=lambda j: (normed[j], -j))
        acc.append(float(pred == gold))
        acc_norm.append(float(pred_norm == gold))
        details.append({"line": example.line, "loglikelihoods": lls, "gold": gold, "pred": pred,
                        "pred_norm": pred_norm})
    _warn_truncated(task, truncated, len(task.examples), lm.config.max_position_embeddings)
    values = {"acc": _mean(acc), "acc_norm": _mean(acc_norm)}
    return {"metrics": {m: values[m] for m in task.metrics}, "truncated": truncated, "details": details}


def run_loglikelihood(lm: LM, task: Task, contexts: list[str], *, batch_size: int, bar: Progress,
                      bos_prefix: BosPrefix = "eos") -> dict:
    """loglikelihood: mean per example; perplexity: exp(−Σ ll / Σ tokens); bits_per_byte: −Σ ll / (ln 2 ·
    UTF-8 bytes of the continuations); acc: share of continuations that greedy decoding would produce."""
    continuations = [task.render(task.options["continuation"], e, "continuation") for e in task.examples]
    requests = [(e, c, task.target_delimiter + cont) for e, c, cont in zip(task.examples, contexts, continuations)]
    scores = loglikelihoods(lm, task, requests, batch_size=batch_size, bar=bar, bos_prefix=bos_prefix)
    total = sum(s.loglikelihood for s in scores)
    n_bytes = sum(len((task.target_delimiter + c).encode("utf-8")) for c in continuations)
    values = {"loglikelihood": total / len(scores),
              "perplexity": math.exp(-total / sum(s.tokens for s in scores)),
              "bits_per_byte": M.bits_per_byte(-total, n_bytes),
              "acc": _mean([float(s.greedy) for s in scores])}
    details = [{"line": e.line, "loglikelihood": s.loglikelihood, "tokens": s.tokens, "greedy": s.greedy}
               for e, s in zip(task.examples, scores)]
    truncated = sum(s.truncated for s in scores)
    _warn_truncated(task, truncated, len(scores), lm.config.max_position_embeddings)
    return {"metrics": {m: values[m] for m in task.metrics}, "truncated": truncated, "details": details}


def _generate(lm: LM, prompts: list[str], *, max_new_tokens: int, stop: list[str], temperature: float = 0.0,
              seeds: list[int] | None = None) -> tuple[list[str], int]:
    """Completions of all `prompts`, decoded as one batch by the LM's engine (each request keeps its own
    stop strings and seed, so each equals its one-at-a-time completion), and how many prompts were cut to
    fit; generate's own per-prompt warning is counted instead."""
    keep = max(1, lm.config.max_position_embeddings - max_new_tokens)
    truncated = sum(len(ids) > keep for ids in lm.tokenizer.encode_batch(prompts)) if lm.tokenizer is not None else 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        texts = lm.generate(prompts, max_new_tokens=max_new_tokens, temperature=temperature, stop=stop, seed=seeds)
    return texts, truncated


def run_generation(lm: LM, task: Task, contexts: list[str], *, bar: Progress) -> dict:
    """Greedy completions scored against the references: SQuAD EM/F1 per example (best reference),
    BLEU/chrF/TER as sacrebleu corpus scores, ROUGE as rouge-score's mean F-measure (first reference)."""
    max_new, stop = task.options.get("max_new_tokens", 32), task.options.get("stop", ["\n"])
    texts, truncated = _generate(lm, contexts, max_new_tokens=max_new, stop=stop)
    predictions = [text.strip() for text in texts]
    bar.update(len(contexts))
    _warn_truncated(task, truncated, len(contexts), lm.config.max_position_embeddings)
    refs = [task.references(e) for e in task.examples]
    values: dict[str, float] = {}
    wanted = set(task.metrics)
    if "exact_match" in wanted:
        values["exact_match"] = _mean([M.exact_match(p, r) for p, r in zip(predictions, refs)])
    if "f1" in wanted:
        values["f1"] = _mean([M.token_f1(p, r) for p, r in zip(predictions, refs)])
    if wanted & {"bleu", "chrf", "ter"}:
        width = max(map(len, refs))  # sacrebleu wants as many references for every hypothesis
        padded = [r + [r[0]] * (width - len(r)) for r in refs]
        for name, fn in (("bleu", M.bleu), ("chrf", M.chrf), ("ter", M.ter)):
            if name in wanted:
                values[name] = fn(predictions, padded)
    rouge_types = [m for m in task.metrics if m.startswith("rouge")]
    if rouge_types:
        values.update(M.rouge(predictions, [r[0] for r in refs], types=rouge_types))
    details = [{"line": e.line, "prediction": p, "references": r} for e, p, r in zip(task.examples, predictions, refs)]
    return {"metrics": {m: values[m] for m in task.metrics}, "truncated": truncated, "details": details}


def run_classification(model: Any, task: Task, *, bar: Progress) -> dict:
    """Predicted labels from the model's classification head against the gold labels."""
    if not isinstance(model, Classifier):
        raise Unsupported("this model has no classification head (it needs `predict(texts)`); "
                          "fine-tune one with a classification head first")
    texts = [task.render(task.prompt, e, "prompt") for e in task.examples]
    gold = [task.label(e) for e in task.examples]
    known = getattr(model, "labels", None)
    if known is not None:  # refuse before scoring: a disjoint label set would score 0 and look like a bad model
        _check_labels(task, gold, [str(label) for label in known], getattr(model, "path", type(model).__name__))
    output = model.predict(texts)
    if len(output) != len(texts):
        raise DataError(f"{type(model).__name__}.predict returned {len(output)} predictions for {len(texts)} texts")
    predictions = [(str(label), dict(probs)) for label, probs in output]
    if known is None:
        _check_labels(task, gold, sorted({p[0] for p in predictions} | {k for p in predictions for k in p[1]}),
                      type(model).__name__)
    bar.update(len(texts))
    pred = [p[0] for p in predictions]
    values = {"accuracy": M.accuracy(gold, pred)}
    for average, suffix in (("macro", ""), ("weighted", "_weighted"), ("micro", "_micro")):
        prf = M.precision_recall_f1(gold, pred, average=average)
        values["f1" + suffix] = prf["f1"]
        if average == "macro":
            values["precision"], values["recall"] = prf["precision"], prf["recall"]
    labels = sorted(set(gold) | set(pred))
    details = [{"line": e.line, "gold": g, "pred": p, "probs": probs}
               for e, g, (p, probs) in zip(task.examples, gold, predictions)]
    return {"metrics": {m: values[m] for m in task.metrics}, "truncated": 0, "details": details,
            "per_class": M.precision_recall_f1(gold, pred, average=None, labels=labels),
            "confusion_matrix": {"labels": labels, "matrix": M.confusion_matrix(gold, pred, labels)}}


def _check_labels(task: Task, gold: list[str], labels: list[str], model: Any) -> None:
    """Gold labels the classifier cannot predict: all of them is an error (the score would be 0 for a
    reason that has nothing to do with the model's quality), some of them a warning."""
    wanted = sorted(set(gold))
    missing = [g for g in wanted if g not in set(labels)]
    if len(missing) == len(wanted):
        raise DataError(f"{task.path}: the task's labels {wanted} and the labels of {model} {sorted(labels)} have "
                        "nothing in common; is this the classifier trained for this task (or does the task's "
                        "`label` field name the right column)?")
    if missing:
        warnings.warn(f"{task.path}: labels {missing} never come out of {model} (its labels: {sorted(labels)}); "
                      "examples with them always count as errors", stacklevel=3)


def run_code(lm: LM, task: Task, contexts: list[str], *, seed: int, isolate: bool, bar: Progress) -> dict:
    """`samples` completions per problem, each run with the problem's tests in the sandbox; pass@k is the
    unbiased estimator (Chen et al. 2021) averaged over problems."""
    check_isolation(isolate)  # cached after the first probe
    n = task.options.get("samples", 1)
    temperature = task.options.get("temperature", 0.0 if n == 1 else 0.8)
    max_new, stop = task.options.get("max_new_tokens", 128), task.options.get("stop", CODE_STOP)
    limits = Limits(timeout=float(task.options.get("timeout", 10)), memory_mb=task.options.get("memory_mb", 1024))
    prompts = [context for context in contexts for _ in range(n)]
    seeds = [seed + 1000 * i + j for i in range(len(contexts)) for j in range(n)]
    completions, truncated = _generate(lm, prompts, max_new_tokens=max_new, stop=stop, temperature=temperature,
                                       seeds=seeds)
    details, passed_counts = [], []
    for i, (example, context) in enumerate(zip(task.examples, contexts)):
        tests = str(example.doc[task.options["tests"]])
        runs = []
        for completion in completions[i * n:(i + 1) * n]:
            result = run_python(context + completion + "\n\n" + tests + "\n", limits, isolate=isolate)
            runs.append({"completion": completion, "status": result.status, "stderr": result.stderr[-2000:]})
            bar.update(bar.done + 1)
        passed_counts.append(sum(r["status"] == "passed" for r in runs))
        details.append({"line": example.line, "passed": passed_counts[-1], "samples": n, "runs": runs})
    _warn_truncated(task, truncated, len(contexts) * n, lm.config.max_position_embeddings)
    values = {m: _mean([M.pass_at_k(n, c, int(m.split("@")[1])) for c in passed_counts]) for m in task.metrics}
    return {"metrics": values, "truncated": truncated, "details": details}


def run_task(model: Any, task: Task, *, seed: int = 1234, batch_size: int = 8, isolate: bool = True,
             progress: bool = True, bos_prefix: BosPrefix = "eos") -> dict:
    """Every number for one task: its metrics, how many prompts were truncated, and per-example details."""
    if task.kind == "classification":
        bar = Progress(len(task.examples), task.name, unit="examples", enabled=progress)
        result = run_classification(model, task, bar=bar)
    elif task.kind in ("retrieval", "document_qa"):
        bar = Progress(len(task.examples), task.name, unit="questions", enabled=progress)
        result = (run_retrieval if task.kind == "retrieval" else run_document_qa)(model, task, bar=bar)
    else:
        if not hasattr(model, "tokenizer"):
            raise Unsupported(f"a {task.kind} task needs a language model; {type(model).__name__} is not one")
        contexts = [task.context(i, seed) for i in range(len(task.examples))]
        if task.kind == "multiple_choice":
            total = sum(len(task.choices(e)) for e in task.examples)
            bar = Progress(total, task.name, unit="requests", enabled=progress)
            result = run_multiple_choice(model, task, contexts, batch_size=batch_size, bar=bar, bos_prefix=bos_prefix)
        elif task.kind == "loglikelihood":
            bar = Progress(len(contexts), task.name, unit="requests", enabled=progress)
            result = run_loglikelihood(model, task, contexts, batch_size=batch_size, bar=bar, bos_prefix=bos_prefix)
        elif task.kind == "generation":
            bar = Progress(len(contexts), task.name, unit="examples", enabled=progress)
            result = run_generation(model, task, contexts, bar=bar)
        else:
            bar = Progress(len(contexts) * task.options.get("samples", 1), task.name, unit="programs",
                           enabled=progress)
            result = run_code(model, task, contexts, seed=seed, isolate=isolate, bar=bar)
    bar.close()
    return {"kind": task.kind, "examples": len(task.examples), "fewshot": task.fewshot, **result}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)
