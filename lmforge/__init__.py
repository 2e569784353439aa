"""lmforge: raw text to a served language model. Every CLI verb is a function here of the same name."""

from lmforge.api import LM, generate, load, models
from lmforge.data.pack import pack
from lmforge.demo import demo
from lmforge.eval.perplexity import perplexity
from lmforge.tokenizer import Tokenizer, train_tokenizer
from lmforge.train.pretrain import pretrain

__version__ = "0.1.0"
__all__ = ["LM", "Tokenizer", "demo", "generate", "load", "models", "pack", "perplexity", "pretrain", "train_tokenizer"]
