"""A `finetune classify` run behind the harness's Classifier protocol (`predict(texts) -> [(label, probs)]`).

It goes through the `predict` verb, the one path that turns texts into head outputs, so evaluation and
`lmforge predict` can never disagree about tokenisation, truncation or pooling.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from lmforge.errors import CheckpointError, ConfigError

HEAD_CONFIG = "head_config.json"


def is_head_run(path: Path) -> bool:
    return (Path(path) / HEAD_CONFIG).is_file()


class HeadClassifier:
    """Predictions of a classification head run directory, batched by `predict`."""

    def __init__(self, path: Path, *, device: str | None = None, batch_size: int = 32) -> None:
        self.path, self.device, self.batch_size = Path(path), device, batch_size
        try:
            self.head = json.loads((self.path / HEAD_CONFIG).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{self.path / HEAD_CONFIG}: unreadable ({e})") from None
        if self.head.get("task") != "classify":
            raise ConfigError(f"{self.path}: a {self.head.get('task')!r} head predicts numbers, not labels; "
                              "classification tasks need a `finetune classify` run")

    def predict(self, texts: list[str]) -> list[tuple[str, dict[str, float]]]:
        from lmforge.finetune.classify import predict

        field = self.head.get("text_field", "text")
        with tempfile.TemporaryDirectory(prefix="lmforge-eval-") as tmp:
            data, out = Path(tmp) / "texts.jsonl", Path(tmp) / "predictions.jsonl"
            data.write_text("".join(json.dumps({field: t}, ensure_ascii=False) + "\n" for t in texts),
                            encoding="utf-8")
            predict(self.path, data, out, batch_size=self.batch_size, device=self.device)
            rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines() if line]
        return [(row["label"], row["probabilities"]) for row in rows]
