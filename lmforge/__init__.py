"""lmforge: raw text to a served language model. Every CLI verb is a function here of the same name."""

from lmforge import convert
from lmforge.compress.distill import distill
from lmforge.compress.prune import prune
from lmforge.compress.quantize import quantize
from lmforge.compress.report import compress_report
from lmforge.data.annotate import annotate, merge_labels, validate
from lmforge.data.pack import pack
from lmforge.data.pipeline import clean, dedup
from lmforge.data.stats import stats
from lmforge.demo import demo
from lmforge.eval.evaluate import evaluate
from lmforge.eval.perplexity import perplexity
from lmforge.export.gguf import export_gguf
from lmforge.export.onnx import export_onnx
from lmforge.infer.chat import chat
from lmforge.infer.generate import generate
from lmforge.lm import LM, load
from lmforge.methods.classify import finetune_classify, finetune_regress, predict
from lmforge.methods.pretrain import pretrain
from lmforge.methods.sft import finetune_full, finetune_lora, merge_lora
from lmforge.model.presets import models
from lmforge.tokenizer import Tokenizer, train_tokenizer

__version__ = "0.1.0"
__all__ = ["LM", "Tokenizer", "annotate", "chat", "clean", "compress_report", "convert", "dedup", "demo", "distill",
           "evaluate", "export_gguf", "export_onnx", "finetune_classify", "finetune_full", "finetune_lora",
           "finetune_regress", "generate", "load",
           "merge_labels", "merge_lora", "models", "pack", "perplexity", "predict", "pretrain", "prune", "quantize",
           "serve", "stats", "train_tokenizer", "validate"]


def __getattr__(name: str):  # `serve` pulls in FastAPI and uvicorn: import them only when it is asked for
    if name == "serve":
        from lmforge.infer.server import serve

        return serve
    raise AttributeError(f"module 'lmforge' has no attribute {name!r}")
