"""`lmforge finetune classify|regress` (a head on a decoder or encoder) and `lmforge predict`.

The run directory is a normal checkpoint of the fine-tuned backbone (config.json, model.safetensors,
tokenizer) plus head.safetensors and head_config.json, so the backbone alone still loads anywhere.
"""

from __future__ import annotations

import json
import math
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lmforge.data.sft import read_records
from lmforge.errors import CheckpointError, ConfigError, DataError
from lmforge.finetune.common import load_backbone, resume_settings, train_config
from lmforge.io import atomic_path, atomic_write_json, remove_stale_temps
from lmforge.model.heads import HeadConfig, Pooling, SequenceHead, head_loss, is_decoder
from lmforge.tokenizer import Tokenizer
from lmforge.train.checkpoint import check_out_dir, load_train_state, save_checkpoint
from lmforge.train.distributed import init_distributed, shutdown
from lmforge.train.loop import train

HEAD_WEIGHTS = "head.safetensors"
HEAD_CONFIG = "head_config.json"
Precision = Literal["bf16-mixed", "32"]
Schedule = Literal["cosine", "linear", "constant"]


def read_labelled(path: Path, text_field: str, target_field: str | None, task: str) -> list[tuple[int, str, Any]]:
    """(line, text, target) per row; the target is a label string (classify) or a float (regress)."""
    rows = []
    for line_no, row in read_records(Path(path)):
        where = f"{path}:{line_no}"
        text = row.get(text_field)
        if not isinstance(text, str) or not text.strip():
            found = "missing" if text_field not in row else "empty or not a string"
            raise DataError(f"{where}: field {text_field!r} is {found} (found keys: {sorted(row)})")
        target: Any = None
        if target_field is not None:
            if target_field not in row or row[target_field] in (None, ""):
                raise DataError(f"{where}: field {target_field!r} missing (found keys: {sorted(row)})")
            value = row[target_field]
            if task == "classify":
                if isinstance(value, (dict, list, float)):
                    raise DataError(f"{where}: label {value!r} must be a string or an integer")
                target = str(value)
            else:
                try:
                    target = float(value)
                except (TypeError, ValueError):
                    raise DataError(f"{where}: field {target_field!r} is {value!r}, not a number") from None
                if not math.isfinite(target):
                    raise DataError(f"{where}: field {target_field!r} is {value!r}, not a finite number")
        rows.append((line_no, text, target))
    if not rows:
        raise DataError(f"{path}: no examples")
    return rows


def encode_texts(tokenizer: Tokenizer, texts: list[str], max_length: int, encoder: bool) -> list[list[int]]:
    """Encoders get the tokenizer's own framing ([CLS] … [SEP]); decoders end each text with eos, the
    position whose state the head reads. Cut to `max_length`, keeping the closing token."""
    if encoder:
        ids = [e.ids for e in tokenizer.hf.encode_batch(texts, add_special_tokens=True)]
    else:
        close = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
        ids = [t + close for t in tokenizer.encode_batch(texts)]
    return [t if len(t) <= max_length else t[:max_length - 1] + t[-1:] for t in ids]


class LabelledLoader:
    """Batches of right-padded texts with their targets, in a seeded order per epoch (resumable).

    Rank r of W takes the r-th slice of each global batch of W·batch_size, as the pretraining loader does.
    """

    def __init__(self, ids: list[list[int]], targets: Tensor, batch_size: int, pad_id: int, *, seed: int = 0,
                 shuffle: bool = True, block_size: int = 256, rank: int = 0, world_size: int = 1) -> None:
        if len(ids) < batch_size * world_size:
            raise DataError(f"{len(ids)} examples are fewer than one batch of {batch_size * world_size}; "
                            "use a smaller --batch-size")
        self.ids, self.targets, self.batch_size, self.pad_id = ids, targets, batch_size, pad_id
        self.seed, self.shuffle, self.block_size = seed, shuffle, block_size
        self.rank, self.world_size = rank, world_size
        self.batches_per_epoch = len(ids) // (batch_size * world_size)
        self.epoch = self.index = 0

    def batch(self, rows: list[int] | np.ndarray) -> dict[str, Tensor]:
        width = max(len(self.ids[i]) for i in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            input_ids[r, :len(self.ids[i])] = torch.tensor(self.ids[i])
            mask[r, :len(self.ids[i])] = 1
        return {"input_ids": input_ids, "attention_mask": mask}

    def next_batch(self) -> tuple[dict[str, Tensor], Tensor]:
        order = (np.random.default_rng((self.seed, self.epoch)).permutation(len(self.ids)) if self.shuffle
                 else np.arange(len(self.ids)))
        start = (self.index * self.world_size + self.rank) * self.batch_size
        rows = order[start:start + self.batch_size]
        self.index += 1
        if self.index >= self.batches_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        return self.batch(rows), self.targets[torch.from_numpy(rows)]

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


def _pad_id(tokenizer: Tokenizer) -> int:
    return next(i for i in (tokenizer.pad_id, tokenizer.eos_id, 0) if i is not None)


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


def _head_saver(net: SequenceHead, backbone_config: Any, out: Path, tokenizer_dir: Path, is_main: bool):
    def save(train_state: dict[str, Any], step: int) -> None:
        if not is_main:
            return
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / HEAD_CONFIG, net.config.to_dict())
        with atomic_path(out / HEAD_WEIGHTS) as tmp:
            tensors = {n: p.detach().contiguous().cpu() for n, p in net.score.named_parameters()}
            save_file(tensors, str(tmp), metadata={"format": "pt", "step": str(step)})
        save_checkpoint(out, net.backbone, backbone_config, tokenizer_dir=tokenizer_dir, train_state=train_state,
                        step=step)

    return save


def _head_step(run: Path) -> int | None:
    from safetensors import safe_open

    with safe_open(str(run / HEAD_WEIGHTS), framework="pt") as f:
        step = (f.metadata() or {}).get("step")
    return int(step) if step is not None else None


def _load_head_train_state(run: Path) -> dict[str, Any]:
    state = load_train_state(run)
    if _head_step(Path(run)) not in (None, state["step"]):
        raise CheckpointError(f"{run}: {HEAD_WEIGHTS} is from step {_head_step(Path(run))} but train_state.pt "
                              f"from step {state['step']}; the save was interrupted")
    return state


def load_head_model(path: Path) -> tuple[SequenceHead, Any, Tokenizer]:
    """A `finetune classify|regress` run directory as (model, backbone config, tokenizer)."""
    path = Path(path)
    if not (path / HEAD_CONFIG).is_file():
        raise CheckpointError(f"{path}: no {HEAD_CONFIG}; not a `finetune classify|regress` run directory")
    backbone, config = load_backbone(path)
    net = SequenceHead(backbone, HeadConfig.from_dict(json.loads((path / HEAD_CONFIG).read_text())))
    tensors = load_file(str(path / HEAD_WEIGHTS))
    if tensors["weight"].shape != net.score.weight.shape:
        raise CheckpointError(f"{path / HEAD_WEIGHTS}: head weight {tuple(tensors['weight'].shape)} does not fit "
                              f"the backbone and labels ({tuple(net.score.weight.shape)})")
    net.score.load_state_dict(tensors)
    return net.eval(), config, Tokenizer.load(path)


def _finetune_head(task: str, args: dict[str, Any]) -> Path:
    ctx = init_distributed(args["device"])
    finished = False
    try:
        if args["resume"] is not None:
            out = Path(args["resume"])
            cfg, run = resume_settings(out, args, task)
            net, backbone_config, tokenizer = load_head_model(out)
            net.train()
            head = net.config
        else:
            if args["model"] is None or args["data"] is None:
                raise ConfigError("--model and --data are required (a checkpoint and a .csv or .jsonl file), "
                                  "or --resume to continue a run")
            out, cfg = Path(args["out"]), train_config(args)
            if ctx.is_main:
                check_out_dir(out)
            torch.manual_seed(cfg.seed)
            backbone, backbone_config = load_backbone(args["model"])
            tokenizer = Tokenizer.load(args["model"])
            head = _new_head(task, args, backbone)
            net = SequenceHead(backbone, head)
            run = {"method": task, "model": str(Path(args["model"]).resolve()),
                   "data": str(Path(args["data"]).resolve()),
                   "val_data": str(Path(args["val_data"]).resolve()) if args["val_data"] else None}
        encoder = not is_decoder(net.backbone)
        max_length = min(head.max_length, backbone_config.max_position_embeddings)
        train_rows = read_labelled(Path(run["data"]), head.text_field, head.target_field, task)
        ids = encode_texts(tokenizer, [t for _, t, _ in train_rows], max_length, encoder)
        loader = LabelledLoader(ids, _targets(head, train_rows, Path(run["data"])), cfg.batch_size, _pad_id(tokenizer),
                                seed=cfg.seed, block_size=max_length, rank=ctx.rank, world_size=ctx.world_size)
        val_loader = None
        if run["val_data"]:
            val_rows = read_labelled(Path(run["val_data"]), head.text_field, head.target_field, task)
            val_ids = encode_texts(tokenizer, [t for _, t, _ in val_rows], max_length, encoder)
            val_loader = LabelledLoader(val_ids, _targets(head, val_rows, Path(run["val_data"])),
                                        min(cfg.batch_size, len(val_ids) // ctx.world_size), _pad_id(tokenizer),
                                        shuffle=False, block_size=max_length, rank=ctx.rank,
                                        world_size=ctx.world_size)
        weights = torch.tensor(head.class_weights) if head.class_weights else None

        def loss_fn(model: nn.Module, x: dict[str, Tensor], y: Tensor) -> Tensor:
            return head_loss(model, x, y, task=task, class_weights=weights)

        if ctx.is_main:
            out.mkdir(parents=True, exist_ok=True)
            remove_stale_temps(out)
            what = f"{len(head.labels)} labels {head.labels}" if task == "classify" else f"target {head.target_field!r}"
            print(f"{task}: {'encoder' if encoder else 'decoder'} backbone, {head.pooling} pooling, {what}; "
                  f"{len(ids)} training texts; precision {cfg.precision}", file=sys.stderr)
        tokenizer_dir = out if args["resume"] is not None else Path(args["model"])
        result = train(net, backbone_config, loader, out, cfg, ctx=ctx, val_loader=val_loader, loss_fn=loss_fn,
                       resume=args["resume"] is not None, run_info=run, progress=args["progress"],
                       save_fn=_head_saver(net, backbone_config, out, tokenizer_dir, ctx.is_main),
                       load_state_fn=_load_head_train_state)
        if ctx.is_main:
            val = f", val loss {result.val_loss:.4f}" if result.val_loss is not None else ""
            print(f"stopped by {result.stopped_by} at step {result.step}{val}; saved in {out}", file=sys.stderr)
        finished = True
        return out
    finally:
        shutdown(ctx, wait_for_all=finished)


def _new_head(task: str, args: dict[str, Any], backbone: nn.Module) -> HeadConfig:
    pooling = args["pooling"] or ("last" if is_decoder(backbone) else "mean")
    target_field = args["label_field"] if task == "classify" else args["target_field"]
    rows = read_labelled(Path(args["data"]), args["text_field"], target_field, task)
    head = HeadConfig(task=task, pooling=pooling, dropout=args["dropout"], max_length=args["max_length"],
                      text_field=args["text_field"], target_field=target_field)
    if task == "classify":
        found = sorted({label for _, _, label in rows})
        head.labels = [str(label) for label in args["labels"]] if args["labels"] else found
        if len(head.labels) < 2:
            raise DataError(f"{args['data']}: classification needs at least 2 labels, found {head.labels}")
        head.class_weights = _class_weights(args["class_weights"], head.labels, [label for _, _, label in rows])
    else:
        values = np.array([t for _, _, t in rows], dtype=np.float64)
        head.target_mean, head.target_std = float(values.mean()), float(values.std()) or 1.0
    return head


def finetune_classify(
    model: Path | None = None,
    data: Path | None = None,
    out: Path = Path("runs/classify"),
    *,
    text_field: str = "text",
    label_field: str = "label",
    labels: list[str] | None = None,
    class_weights: Literal["balanced"] | list[float] | None = None,
    pooling: Pooling | None = None,
    val_data: Path | None = None,
    max_length: int = 256,
    dropout: float = 0.1,
    max_steps: int | None = None,
    max_minutes: float | None = None,
    batch_size: int = 16,
    grad_accum: int = 1,
    lr: float = 5e-5,
    warmup_steps: int = 10,
    schedule: Schedule = "linear",
    lr_decay_steps: int | None = None,
    weight_decay: float = 0.01,
    grad_clip: float | None = 1.0,
    precision: Precision | None = None,
    eval_every: int = 100,
    eval_batches: int = 20,
    save_every: int = 500,
    log_every: int = 10,
    seed: int = 0,
    device: str | None = None,
    resume: Path | None = None,
    progress: bool = True,
) -> Path:
    """Fine-tune a backbone with a sequence-classification head (cross-entropy, optionally class-weighted).

    Args:
        model: Decoder or encoder checkpoint: ours, or a Hugging Face directory (e.g. all-MiniLM-L6-v2).
        data: Labelled texts, .csv (with a header) or .jsonl.
        out: Run directory; refused if it holds anything.
        text_field: Column holding the text.
        label_field: Column holding the label.
        labels: The declared label set, in logit order (default: the labels found in data, sorted); a row
            with another label is an error naming its line.
        class_weights: "balanced" (n / (classes · count)) or one weight per label.
        pooling: "last" token (decoder default), "cls" or "mean" over tokens (encoder default).
        val_data: Held-out labelled texts for the validation loss.
        max_length: Texts are cut to this many tokens.
        dropout: Dropout before the head.
        max_steps: Stop after this many optimizer steps.
        max_minutes: Stop after this much wall time.
        batch_size: Texts per micro-batch.
        grad_accum: Micro-batches per optimizer step.
        lr: Peak learning rate.
        warmup_steps: Steps of linear warmup.
        schedule: Decay after warmup.
        lr_decay_steps: Steps over which the schedule decays (default: max_steps).
        weight_decay: Decoupled weight decay on matrices.
        grad_clip: Clip the global gradient norm; null disables.
        precision: "bf16-mixed" or "32"; default the faster one here.
        eval_every: Steps between validation losses.
        eval_batches: Batches per validation.
        save_every: Steps between checkpoints.
        log_every: Steps between metrics lines.
        seed: Seed for the head's init, data order and dropout.
        device: "cpu", "cuda", ...
        resume: Continue a stopped run exactly (only max_steps / max_minutes may be given anew).
        progress: Show the progress line.

    Returns:
        The run directory.
    """
    return _finetune_head("classify", {**locals(), "target_field": None})


def finetune_regress(
    model: Path | None = None,
    data: Path | None = None,
    out: Path = Path("runs/regress"),
    *,
    text_field: str = "text",
    target_field: str = "score",
    pooling: Pooling | None = None,
    val_data: Path | None = None,
    max_length: int = 256,
    dropout: float = 0.1,
    max_steps: int | None = None,
    max_minutes: float | None = None,
    batch_size: int = 16,
    grad_accum: int = 1,
    lr: float = 5e-5,
    warmup_steps: int = 10,
    schedule: Schedule = "linear",
    lr_decay_steps: int | None = None,
    weight_decay: float = 0.01,
    grad_clip: float | None = 1.0,
    precision: Precision | None = None,
    eval_every: int = 100,
    eval_batches: int = 20,
    save_every: int = 500,
    log_every: int = 10,
    seed: int = 0,
    device: str | None = None,
    resume: Path | None = None,
    progress: bool = True,
) -> Path:
    """Fine-tune a backbone with a regression head: mean squared error on the standardized target.

    Args:
        model: Decoder or encoder checkpoint (ours or a Hugging Face directory).
        data: Texts with a numeric target, .csv or .jsonl.
        out: Run directory; refused if it holds anything.
        text_field: Column holding the text.
        target_field: Column holding the number to predict.
        pooling: "last" token (decoder default), "cls" or "mean" (encoder default).
        val_data: Held-out rows for the validation loss.
        max_length: Texts are cut to this many tokens.
        dropout: Dropout before the head.
        max_steps: Stop after this many optimizer steps.
        max_minutes: Stop after this much wall time.
        batch_size: Texts per micro-batch.
        grad_accum: Micro-batches per optimizer step.
        lr: Peak learning rate.
        warmup_steps: Steps of linear warmup.
        schedule: Decay after warmup.
        lr_decay_steps: Steps over which the schedule decays (default: max_steps).
        weight_decay: Decoupled weight decay on matrices.
        grad_clip: Clip the global gradient norm; null disables.
        precision: "bf16-mixed" or "32"; default the faster one here.
        eval_every: Steps between validation losses.
        eval_batches: Batches per validation.
        save_every: Steps between checkpoints.
        log_every: Steps between metrics lines.
        seed: Seed for the head's init, data order and dropout.
        device: "cpu", "cuda", ...
        resume: Continue a stopped run exactly (only max_steps / max_minutes may be given anew).
        progress: Show the progress line.

    Returns:
        The run directory.
    """
    return _finetune_head("regress", {**locals(), "label_field": None, "labels": None, "class_weights": None})


@torch.no_grad()
def predict(model: Path, data: Path, out: Path = Path("predictions.jsonl"), *, batch_size: int = 32,
            device: str | None = None) -> dict[str, Any]:
    """Run a `finetune classify|regress` model over texts; one JSON line per input row.

    Classification lines hold the predicted `label` and `probabilities` per class; regression lines the
    `prediction`. If the data also carries the target column, the scores are returned (accuracy and
    macro-F1, or MSE and MAE).

    Args:
        model: A `finetune classify` or `finetune regress` run directory.
        data: Texts in the training format (.csv or .jsonl with the same text column).
        out: JSONL file to write.
        batch_size: Texts per forward pass.
        device: "cpu", "cuda", ...

    Returns:
        The number of rows written and, where targets are present, the scores.
    """
    net, config, tokenizer = load_head_model(Path(model))
    head = net.config
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    net.to(dev)
    first = next(read_records(Path(data)), (0, {}))[1]
    has_target = head.target_field in first
    rows = read_labelled(Path(data), head.text_field, head.target_field if has_target else None, head.task)
    ids = encode_texts(tokenizer, [t for _, t, _ in rows], min(head.max_length, config.max_position_embeddings),
                       not is_decoder(net.backbone))
    if has_target:
        _targets(head, rows, Path(data))  # every label must be one the head knows
    loader = LabelledLoader(ids, torch.zeros(len(ids)), 1, _pad_id(tokenizer), shuffle=False)
    outputs = []
    for start in range(0, len(ids), batch_size):
        batch = {k: v.to(dev) for k, v in loader.batch(list(range(start, min(start + batch_size, len(ids))))).items()}
        outputs.append(net(batch["input_ids"], batch["attention_mask"]).float().cpu())
    scores = torch.cat(outputs)
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
