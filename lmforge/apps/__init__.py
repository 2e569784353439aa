"""Applications on top of the engine: translate, summarize, retrieve + answer (QA over documents), code."""
