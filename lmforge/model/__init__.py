from lmforge.model.gpt import GPT, KVCache

__all__ = ["GPT", "KVCache"]
