"""A `finetune classify` run behind the harness's Classifier protocol (`predict(texts) -> [(label, probs)]`).

It loads the run once through `load_model` and scores texts with `predict_texts`, the one path that turns
texts into head outputs, so evaluation, `lmforge predict` and `data annotate` never disagree about
tokenisation, truncation or pooling.
"""

from __future__ import annotations

from pathlib import Path

from lmforge.checkpoint import HEAD_CONFIG, load_model
from lmforge.errors import ConfigError
from lmforge.model.heads import predict_texts


def is_head_run(path: Path) -> bool:
    return (Path(path) / HEAD_CONFIG).is_file()


class HeadClassifier:
    """Predictions of a classification head run directory, in batches."""

    def __init__(self, path: Path, *, device: str | None = None, batch_size: int = 32) -> None:
        self.path, self.batch_size = Path(path), batch_size
        self.loaded = load_model(self.path, device=device)
        self.head = self.loaded.model.config
        if self.head.task != "classify":
            raise ConfigError(f"{self.path}: a {self.head.task!r} head predicts numbers, not labels; "
                              "classification tasks need a `finetune classify` run")

    @property
    def labels(self) -> list[str]:
        return list(self.head.labels)

    def predict(self, texts: list[str]) -> list[tuple[str, dict[str, float]]]:
        probs = predict_texts(self.loaded.model, self.loaded.tokenizer, texts, self.batch_size).softmax(-1)
        labels = self.head.labels
        return [(labels[int(row.argmax())], {lab: round(float(p), 6) for lab, p in zip(labels, row)}) for row in probs]
