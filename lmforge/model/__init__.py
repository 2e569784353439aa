from lmforge.model.gpt import GPT, KVCache, count_parameters

__all__ = ["GPT", "KVCache", "count_parameters"]
