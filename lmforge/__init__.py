"""lmforge: raw text to a served language model. Every CLI verb is a function here of the same name."""

from lmforge import convert
from lmforge.apps import code
from lmforge.apps.answer import answer
from lmforge.apps.retrieve import index, retrieve
from lmforge.apps.summarize import summarize
from lmforge.apps.translate import translate
from lmforge.compress.distill import distill
from lmforge.compress.prune import prune
from lmforge.compress.quantize import quantize
from lmforge.compress.report import compress_report
from lmforge.convert import convert_sharded
from lmforge.data.annotate import annotate, merge_labels, validate
from lmforge.data.pack import pack
from lmforge.data.pairs import pairs
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
from lmforge.methods.qa import finetune_qa
from lmforge.methods.sft import finetune_full, finetune_lora, merge_lora
from lmforge.model.presets import models
from lmforge.tokenizer import Tokenizer, train_tokenizer
from lmforge.train.plan import plan

__version__ = "0.1.0"
__all__ = [
    "LM",
    "Tokenizer",
    "annotate",
    "answer",
    "chat",
    "clean",
    "code",
    "compress_report",
    "convert",
    "convert_sharded",
    "dedup",
    "demo",
    "distill",
    "evaluate",
    "export_gguf",
    "export_onnx",
    "finetune_classify",
    "finetune_full",
    "finetune_lora",
    "finetune_qa",
    "finetune_regress",
    "generate",
    "index",
    "load",
    "merge_labels",
    "merge_lora",
    "models",
    "pack",
    "pairs",
    "perplexity",
    "plan",
    "predict",
    "pretrain",
    "prune",
    "quantize",
    "retrieve",
    "serve",
    "stats",
    "summarize",
    "train_tokenizer",
    "translate",
    "validate",
]


def __getattr__(name: str):  # `serve` pulls in FastAPI and uvicorn: import them only when it is asked for
    if name == "serve":
        from lmforge.infer.server import serve

        return serve
    raise AttributeError(f"module 'lmforge' has no attribute {name!r}")
