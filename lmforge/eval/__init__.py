"""Evaluation: metrics, task files, the harness that scores a model on them, and the sandbox for code."""

from lmforge.eval.evaluate import compare, evaluate

__all__ = ["compare", "evaluate"]
