"""`lmforge compress`: smaller and faster models that give nearly the same answers.

quantize.py (int8 / int4 weight-only, run by PyTorch's CPU kernels through `lmforge.model.quant`), prune.py
(magnitude, Wanda, N:M, and structured head / FFN-channel removal, with recovery fine-tuning), distill.py
(a student trained on a teacher's softened distribution) and report.py (size, speed and perplexity side by side).
"""
