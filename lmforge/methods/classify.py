"""`lmforge finetune classify|regress` (a head on a decoder or encoder) and `lmforge predict`.

The run directory is a normal checkpoint of the fine-tuned backbone (config.json, model.safetensors,
tokenizer) plus head.safetensors and head_config.json (`checkpoint.save_head`), so the backbone alone
still loads anywhere and `checkpoint.load_model` opens the whole classifier.
"""

from __future__ import annotations

import functools
import json
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from lmforge.checkpoint import load_model, save_head
from lmforge.data.labelled import read_labelled
from lmforge.data.readers import read_rows
from lmforge.errors import ConfigError, DataError
from lmforge.io import atomic_path, check_output
from lmforge.model.heads import (
    HeadConfig,
    Pooling,
    SequenceHead,
    encode_texts,
    head_loss,
    is_decoder,
    pad_id,
    predict_texts,
)
from lmforge.options import Dtype, torch_dtype
from lmforge.train.loaders import LabelledLoader
from lmforge.train.shell import Context, Method, training_verb

HEAD_DEFAULTS = dict(batch_size=16, lr=5e-5, warmup_steps=10, schedule="linear", weight_decay=0.01, eval_every=100)


@training_verb("finetune classify", out=Path("runs/classify"), **HEAD_DEFAULTS)
def finetune_classify(
    ctx: Context,
    model: Path | None = None,
    data: Path | None = None,
    *,
    text_field: str = "text",
    label_field: str = "label",
    labels: list[str] | None = None,
    class_weights: Literal["balanced"] | list[float] | None = None,
    pooling: Pooling | None = None,
    val_data: Path | None = None,
    max_length: int = 256,
    dropout: float = 0.1,
) -> Method:
    """Fine-tune a backbone with a sequence-classification head (cross-entropy, optionally class-weighted).

    Args:
        model: Decoder or encoder checkpoint: ours, or a Hugging Face directory (e.g. all-MiniLM-L6-v2).
        data: Labelled texts, .csv (with a header) or .jsonl.
        text_field: Column holding the text.
        label_field: Column holding the label.
        labels: The declared label set, in logit order (default: the labels found in data, sorted); a row
            with another label is an error naming its line.
        class_weights: "balanced" (n / (classes · count)) or one weight per label.
        pooling: "last" token (decoder default), "cls" or "mean" over tokens (encoder default).
        val_data: Held-out labelled texts for the validation loss.
        max_length: Texts are cut to this many tokens.
        dropout: Dropout before the head.

    Returns:
        The run directory.
    """
    head = dict(text_field=text_field, target_field=label_field, labels=labels, class_weights=class_weights,
                pooling=pooling, max_length=max_length, dropout=dropout)
    return _head_method(ctx, "classify", model, data, val_data, head)


@training_verb("finetune regress", out=Path("runs/regress"), **HEAD_DEFAULTS)
def finetune_regress(
    ctx: Context,
    model: Path | None = None,
    data: Path | None = None,
    *,
    text_field: str = "text",
    target_field: str = "score",
    pooling: Pooling | None = None,
    val_data: Path | None = None,
    max_length: int = 256,
    dropout: float = 0.1,
) -> Method:
    """Fine-tune a backbone with a regression head: mean squared error on the standardized target.

    Args:
        model: Decoder or encoder checkpoint (ours or a Hugging Face directory).
        data: Texts with a numeric target, .csv or .jsonl.
        text_field: Column holding the text.
        target_field: Column holding the number to predict.
        pooling: "last" token (decoder default), "cls" or "mean" (encoder default).
        val_data: Held-out rows for the validation loss.
        max_length: Texts are cut to this many tokens.
        dropout: Dropout before the head.

    Returns:
        The run directory.
    """
    head = dict(text_field=text_field, target_field=target_field, pooling=pooling, max_length=max_length,
                dropout=dropout)
    return _head_method(ctx, "regress", model, data, val_data, head)


def _head_method(ctx: Context, task: str, model: Path | None, data: Path | None, val_data: Path | None,
                 head_options: dict[str, Any]) -> Method:
    """A head on a backbone (new, or the resumed run's), trained on labelled texts with `head_loss`."""
    if model is None or data is None:
        raise ConfigError("--model and --data are required (a checkpoint and a .csv or .jsonl file), "
                          "or --resume to continue a run")
    if ctx.resume is not None:
        loaded = load_model(ctx.resume, dtype=torch.float32)
        net = loaded.model
    else:
        loaded = load_model(Path(model), dtype=torch.float32)
        if loaded.kind not in ("decoder", "encoder"):
            raise ConfigError(f"{model}: is a {loaded.kind} run; a head trains on a plain decoder or encoder")
        net = SequenceHead(loaded.model, _new_head(task, loaded.model, Path(data), **head_options))
    head, cfg, dist = net.config, ctx.cfg, ctx.dist
    encoder = not is_decoder(net.backbone)
    max_length = min(head.max_length, loaded.config.max_position_embeddings)
    pad = pad_id(loaded.tokenizer)

    def labelled(path: Path, train: bool) -> LabelledLoader:
        """Training batches in a seeded order; validation in file order, its batch shrunk to fit a small file."""
        rows = read_labelled(path, head.text_field, head.target_field, task)
        ids = encode_texts(loaded.tokenizer, [t for _, t, _ in rows], max_length, encoder)
        batch_size = cfg.batch_size if train else max(1, min(cfg.batch_size, len(ids) // dist.world_size))
        return LabelledLoader(ids, _targets(head, rows, path), batch_size, pad, seed=cfg.seed, shuffle=train,
                              block_size=max_length, rank=dist.rank, world_size=dist.world_size)

    loader = labelled(Path(data), train=True)
    val_loader = labelled(Path(val_data), train=False) if val_data is not None else None
    weights = torch.tensor(head.class_weights) if head.class_weights else None

    def save(out: Path, train_state: dict[str, Any] | None, step: int) -> None:
        save_head(out, net, loaded.config, tokenizer_dir=loaded.path, train_state=train_state, step=step)

    what = f"{len(head.labels)} labels {head.labels}" if task == "classify" else f"target {head.target_field!r}"
    summary = (f"{task}: {'encoder' if encoder else 'decoder'} backbone, {head.pooling} pooling, {what}; "
               f"{len(loader.ids)} training texts")
    return Method(net, loader, functools.partial(head_loss, task=task, class_weights=weights), save,
                  val_loader=val_loader, summary=summary)


def _new_head(task: str, backbone: nn.Module, data: Path, *, text_field: str, target_field: str,
              pooling: Pooling | None, max_length: int, dropout: float, labels: list[str] | None = None,
              class_weights: str | list[float] | None = None) -> HeadConfig:
    rows = read_labelled(data, text_field, target_field, task)
    head = HeadConfig(task=task, pooling=pooling or ("last" if is_decoder(backbone) else "mean"), dropout=dropout,
                      max_length=max_length, text_field=text_field, target_field=target_field)
    if task == "classify":
        found = sorted({label for _, _, label in rows})
        head.labels = [str(label) for label in labels] if labels else found
        if len(head.labels) < 2:
            raise DataError(f"{data}: classification needs at least 2 labels, found {head.labels}")
        head.class_weights = _class_weights(class_weights, head.labels, [label for _, _, label in rows])
    else:
        values = np.array([t for _, _, t in rows], dtype=np.float64)
        head.target_mean, head.target_std = float(values.mean()), float(values.std()) or 1.0
    return head


def _targets(head: HeadConfig, rows: list[tuple[int, str, Any]], path: Path) -> Tensor:
    if head.task == "classify":
        index = {label: i for i, label in enumerate(head.labels)}
        for line_no, _, label in rows:
            if label not in index:
                raise DataError(f"{path}:{line_no}: label {label!r} is not one of the declared labels {head.labels}")
        return torch.tensor([index[label] for _, _, label in rows], dtype=torch.long)
    values = torch.tensor([t for _, _, t in rows], dtype=torch.float32)
    return (values - head.target_mean) / head.target_std


def _class_weights(setting: str | list[float] | None, labels: list[str], train_labels: list[str]) -> list[float] | None:
    if setting is None:
        return None
    if setting == "balanced":  # n / (k · count), scikit-learn's "balanced"
        counts = Counter(train_labels)
        return [len(train_labels) / (len(labels) * max(counts[label], 1)) for label in labels]
    if isinstance(setting, str):
        raise ConfigError(f"class_weights={setting!r}: use 'balanced' or one number per label")
    if len(setting) != len(labels):
        raise ConfigError(f"class_weights has {len(setting)} values for {len(labels)} labels {labels}")
    return [float(w) for w in setting]


@torch.no_grad()
def predict(model: Path, data: Path, out: Path = Path("predictions.jsonl"), *, text_field: str | None = None,
            batch_size: int = 32, device: str | None = None, dtype: Dtype | None = None,
            overwrite: bool = False) -> dict[str, Any]:
    """Run a `finetune classify|regress` model over texts; one JSON line per input row.

    Classification lines hold the predicted `label` and `probabilities` per class; regression lines the
    `prediction`. If the data also carries the target column, the scores are returned (accuracy and
    macro-F1, or MSE and MAE).

    Args:
        model: A `finetune classify` or `finetune regress` run directory.
        data: Texts in the training format (.csv or .jsonl).
        out: JSONL file to write; refused if it exists, unless `overwrite`.
        text_field: The column holding the text; default the one the model was trained on.
        batch_size: Texts per forward pass.
        device: "cpu", "cuda", ...
        dtype: Cast the weights ("float32" or "bfloat16"); default the checkpoint's own.
        overwrite: Replace `out`.

    Returns:
        The number of rows written and, where targets are present, the scores.
    """
    check_output(out, overwrite)
    loaded = load_model(Path(model), device=device or ("cuda" if torch.cuda.is_available() else "cpu"),
                        dtype=torch_dtype(dtype))
    if loaded.kind != "head":
        raise ConfigError(f"{model}: no head_config.json; not a `finetune classify|regress` run directory")
    net, head = loaded.model, loaded.model.config
    first = next(iter(read_rows(Path(data))), (0, {}))[1]
    has_target = head.target_field in first
    rows = read_labelled(Path(data), text_field or head.text_field, head.target_field if has_target else None,
                         head.task)
    if has_target:
        _targets(head, rows, Path(data))  # every label must be one the head knows
    scores = predict_texts(net, loaded.tokenizer, [t for _, t, _ in rows], batch_size)
    lines, predicted = [], []
    for (line_no, _, _), row in zip(rows, scores):
        if head.task == "classify":
            probs = row.softmax(-1).tolist()
            label = head.labels[int(row.argmax())]
            predicted.append(label)
            lines.append({"line": line_no, "label": label,
                          "probabilities": {lab: round(p, 6) for lab, p in zip(head.labels, probs)}})
        else:
            value = float(row[0]) * head.target_std + head.target_mean
            predicted.append(value)
            lines.append({"line": line_no, "prediction": value})
    with atomic_path(Path(out)) as tmp:
        tmp.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines), encoding="utf-8")
    result: dict[str, Any] = {"rows": len(lines), "out": str(out)}
    if has_target:
        truth = [t for _, _, t in rows]
        if head.task == "classify":
            from lmforge.eval.metrics import accuracy, precision_recall_f1

            result["accuracy"] = accuracy(truth, predicted)
            result["macro_f1"] = precision_recall_f1(truth, predicted, average="macro", labels=head.labels)["f1"]
        else:
            errors = np.array(predicted) - np.array(truth)
            result["mse"], result["mae"] = float((errors ** 2).mean()), float(np.abs(errors).mean())
    return result
