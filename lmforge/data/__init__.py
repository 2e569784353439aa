"""Corpus readers, token packing and training-window loading."""

from lmforge.data.datasets import iter_documents, list_files
from lmforge.data.pack import PackedDataset, WindowLoader, pack

__all__ = ["PackedDataset", "WindowLoader", "iter_documents", "list_files", "pack"]
