"""Fine-tuning verbs: `finetune full|lora|classify|regress`, `merge-lora`, `predict` — all through the one loop."""

from lmforge.finetune.classify import finetune_classify, finetune_regress, predict
from lmforge.finetune.lm import finetune_full, finetune_lora, merge_lora

__all__ = ["finetune_classify", "finetune_full", "finetune_lora", "finetune_regress", "merge_lora", "predict"]
