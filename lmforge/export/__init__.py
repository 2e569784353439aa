"""`lmforge export gguf | onnx | hf`: a checkpoint in the formats other runtimes load (llama.cpp, onnxruntime,
transformers). GGUF is gguf.py, ONNX is onnx.py; HF export is `lmforge convert to-hf` (convert.py)."""
