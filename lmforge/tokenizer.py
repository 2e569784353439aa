"""Byte-level BPE (Sennrich et al. 2016; GPT-2's byte-level variant, Radford et al. 2019) via HF `tokenizers`.

Byte level means every string has an encoding: the base alphabet is the 256 bytes, so there is no
unknown token and decode(encode(s)) == s for every string. Files are the HF format (tokenizer.json plus
tokenizer_config.json), so a tokenizer trained here loads in transformers and any HF tokenizer loads here.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from lmforge.errors import CheckpointError, ConfigError
from lmforge.io import atomic_write_json, atomic_write_text, check_output

if TYPE_CHECKING:
    from lmforge.data.readers import TextUnit

EOS = "<|endoftext|>"
PAD = "<|pad|>"
BOS = "<|begin_of_text|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [EOS, PAD, BOS, IM_START, IM_END]
# Fill-in-the-middle sentinels (Bavarian et al. 2022), given ids 5-7 when a tokenizer is trained for code.
FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE = "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"
# (prefix, suffix, middle) as each model family spells them; imported models keep theirs.
FIM_NAMES: list[tuple[str, str, str]] = [
    (FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE),  # lmforge, Qwen2.5-Coder, CodeGemma
    ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),  # StarCoder, StarCoder2
    ("<fim-prefix>", "<fim-suffix>", "<fim-middle>"),  # SantaCoder
    ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"),  # DeepSeek-Coder
]
# Tokens that end a generated middle besides eos (the file and padding separators of those families).
FIM_STOPS = ("<|fim_pad|>", "<|file_sep|>", "<|repo_name|>", "<fim_pad>", "<file_sep>", "<reponame>")

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# transformers' VERY_LARGE_INTEGER: "no limit here"; the model's context length is in config.json.
_NO_MAX_LENGTH = int(1e30)


def train_tokenizer(
    data: Path,
    out: Path = Path("tok"),
    *,
    vocab_size: int = 8192,
    text_field: str = "text",
    fields: str | None = None,
    glob: str | None = None,
    text_unit: TextUnit = "file",
    min_frequency: int = 2,
    max_documents: int | None = None,
    fim: bool | None = None,
    overwrite: bool = False,
) -> Path:
    """Train a byte-level BPE tokenizer on a corpus.

    The tokenizer reserves <|endoftext|> (ends every document), <|pad|>, <|begin_of_text|>,
    <|im_start|> and <|im_end|> (ChatML chat turns) as ids 0-4, and ships a ChatML chat template.
    Any string round-trips exactly: there is no unknown token and no normalization.

    Args:
        data: A text, JSONL, CSV/TSV or Parquet file (optionally .gz/.zst), a folder searched recursively
            for them, or a folder written by `data clean` / `data dedup`.
        out: Directory to write tokenizer.json and tokenizer_config.json into; refused if it holds anything,
            unless `overwrite`.
        vocab_size: Total vocabulary size including the 256 byte tokens and the 5 special tokens.
        text_field: The JSONL field / CSV or Parquet column holding the text.
        fields: Several fields, comma-separated, each read as a document of its own: "source,target" trains
            one vocabulary shared by both sides of a pairs directory (`lmforge data pairs`), whose
            train.jsonl alone is read, so held-out pairs do not shape the vocabulary.
        glob: Only read files matching this pattern, e.g. "*.jsonl".
        text_unit: For plain-text files: one document per "file" or per blank-line "paragraph" block.
        min_frequency: Only merge pairs seen at least this many times.
        max_documents: Train on the first this many documents only (faster on a big corpus).
        fim: Also reserve <|fim_prefix|>, <|fim_suffix|>, <|fim_middle|> (ids 5-7) for fill-in-the-middle
            training (`data pack --fim-rate`); by default on for a code corpus (`lmforge.data.fim.is_code_corpus`:
            written by `data clean --preset code`, or mostly source files by extension).
        overwrite: Replace what `out` holds.

    Returns:
        The tokenizer directory.
    """
    if fim is None:
        from lmforge.data.fim import is_code_corpus

        fim = is_code_corpus(data, glob)
    specials = SPECIAL_TOKENS + ([FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE] if fim else [])
    minimum = 256 + len(specials)
    if vocab_size < minimum:
        raise ConfigError(
            f"vocab_size={vocab_size} is too small: byte-level BPE needs at least {minimum} "
            f"(256 bytes + {len(specials)} special tokens)"
        )
    if max_documents is not None and max_documents < 1:
        raise ConfigError(f"max_documents={max_documents} must be at least 1")
    # Imported here: lmforge.data's packer imports this module, and the tokenizer must load without it.
    from lmforge.data.pairs import is_pairs_dir
    from lmforge.data.readers import count_documents, iter_texts

    out = Path(out)
    check_output(out, overwrite)
    names = [f.strip() for f in fields.split(",") if f.strip()] if fields else [text_field]
    if is_pairs_dir(data):
        data = Path(data) / "train.jsonl"
    length = min(count_documents(data, glob=glob, cap=max_documents) * len(names), max_documents or sys.maxsize)

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=sys.stderr.isatty(),  # its bar prints blank lines into logs
    )

    def documents() -> Iterator[str]:
        # Fields interleaved row by row, so --max-documents takes every side of the first rows.
        streams = [iter_texts(data, text_field=name, glob=glob, text_unit=text_unit) for name in names]
        texts = (t for row in itertools.zip_longest(*streams) for t in row if t is not None)
        for i, doc in enumerate(texts):
            if max_documents is not None and i >= max_documents:
                return
            yield doc

    print(f"training a {vocab_size}-token BPE tokenizer on {data} (~{length:,} documents)", file=sys.stderr)
    tok.train_from_iterator(documents(), trainer=trainer, length=length)
    config = _default_config()
    config["additional_special_tokens"] += specials[len(SPECIAL_TOKENS):]
    result = Tokenizer(tok, config)
    result.save(out)
    print(f"wrote {out}/tokenizer.json ({result.vocab_size} tokens)", file=sys.stderr)
    return out


@dataclass(frozen=True)
class FimTokens:
    """Ids of a tokenizer's fill-in-the-middle sentinels, their names, and extra stop tokens for a middle."""

    prefix: int
    suffix: int
    middle: int
    names: tuple[str, str, str]
    stop_names: tuple[str, ...] = ()


def _default_config() -> dict[str, Any]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": None,
        "additional_special_tokens": [IM_START, IM_END],
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": _NO_MAX_LENGTH,
        "chat_template": CHATML_TEMPLATE,
    }


def _token_content(value: Any) -> str | None:
    """tokenizer_config.json stores special tokens as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special-token and chat-template settings of tokenizer_config.json."""

    def __init__(self, tokenizer: HFTokenizer, config: dict[str, Any] | None = None):
        self.hf = tokenizer
        # A tokenizer.json may carry fixed padding/truncation (MiniLM's pads to 128); lengths are ours to manage.
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self.config: dict[str, Any] = dict(config or {})
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        # Ids need not be contiguous in foreign tokenizers; size embeddings by the largest id.
        self.vocab_size = max(
            tokenizer.get_vocab_size(with_added_tokens=True), max(vocab.values(), default=-1) + 1
        )
        self.eos_id = self._resolve("eos_token", EOS)
        self.bos_id = self._resolve("bos_token", BOS)
        self.pad_id = self._resolve("pad_token", PAD)
        configured = self.config.get("add_bos_token")
        self._bos_by_default = self._post_processor_adds_bos() if configured is None else bool(configured)
        self.add_bos = self._bos_by_default
        # Generation ends at any of these; `lmforge.load` adds generation_config.json's eos_token_id list.
        self.stop_ids: set[int] = {self.eos_id} if self.eos_id is not None else set()
        template = self.config.get("chat_template")
        if isinstance(template, list):  # transformers' multi-template form: [{"name", "template"}]
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        self.chat_template: str | None = template if isinstance(template, str) else None

    def _resolve(self, key: str, default: str) -> int | None:
        if key in self.config:
            content = _token_content(self.config[key])
            return None if content is None else self.hf.token_to_id(content)
        return self.hf.token_to_id(default)

    def _post_processor_adds_bos(self) -> bool:
        """Whether tokenizer.json itself prepends BOS (Llama 3 does, with no add_bos_token in its config)."""
        if self.bos_id is None:
            return False
        with_specials = self.hf.encode("a", add_special_tokens=True).ids
        without = self.hf.encode("a", add_special_tokens=False).ids
        return with_specials[:1] == [self.bos_id] and without[:1] != [self.bos_id]

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load a tokenizer directory: ours, or an HF model's as transformers saves it.

        tokenizer.json is the tokenizer; without one, BERT's vocab.txt (WordPiece) or GPT-2's
        vocab.json + merges.txt (byte-level BPE) are read. Settings come from tokenizer_config.json,
        with special_tokens_map.json filling gaps and chat_template.jinja (transformers ≥ 4.43) the template.
        """
        path = Path(path)
        directory = path.parent if path.is_file() and path.name == "tokenizer.json" else path
        config = _read_json_object(directory / "tokenizer_config.json")
        for key, value in _read_json_object(directory / "special_tokens_map.json").items():
            config.setdefault(key, value)
        template_file = directory / "chat_template.jinja"
        if "chat_template" not in config and template_file.is_file():
            config["chat_template"] = template_file.read_text(encoding="utf-8")
        file = directory / "tokenizer.json"
        if file.is_file():
            try:
                tok = HFTokenizer.from_file(str(file))
            except Exception as e:  # tokenizers raises plain Exception on a malformed file
                raise CheckpointError(f"{file}: not a valid HF tokenizers file ({e})") from None
        elif (directory / "vocab.txt").is_file():
            tok = _wordpiece(directory / "vocab.txt", config)
        elif (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
            return cls.from_bpe_files(directory / "vocab.json", directory / "merges.txt", config)
        else:
            raise CheckpointError(
                f"{directory}: no tokenizer.json (nor vocab.txt, nor vocab.json + merges.txt) here; "
                "train one with `lmforge tokenizer train`"
            )
        return cls(tok, config)

    @classmethod
    def from_bpe_files(cls, vocab: str | Path, merges: str | Path, config: dict[str, Any] | None = None) -> Tokenizer:
        """GPT-2's byte-level BPE from its vocabulary JSON and merges list (encoder.json + vocab.bpe, or
        vocab.json + merges.txt): no prefix space, <|endoftext|> as bos, eos and unk."""
        from tokenizers.processors import ByteLevel as ByteLevelProcessor

        tok = HFTokenizer(models.BPE.from_file(str(vocab), str(merges)))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = ByteLevelProcessor(trim_offsets=False)
        tok.add_special_tokens([EOS])
        settings = {"tokenizer_class": "GPT2Tokenizer", "bos_token": EOS, "eos_token": EOS, "unk_token": EOS,
                    "add_bos_token": False, "model_max_length": 1024, **(config or {})}
        return cls(tok, settings)

    def save(self, directory: str | Path) -> Path:
        """Write tokenizer.json and tokenizer_config.json into `directory` (each atomically)."""
        directory = Path(directory)
        atomic_write_text(directory / "tokenizer.json", self.hf.to_str(pretty=True))
        config = dict(self.config)
        if "add_bos_token" in config or self.add_bos != self._bos_by_default:
            config["add_bos_token"] = self.add_bos
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        atomic_write_json(directory / "tokenizer_config.json", config)
        return directory

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        ids = self.hf.encode(text, add_special_tokens=False).ids
        return self._with_bos(ids, add_bos)

    def encode_batch(self, texts: Iterable[str], *, add_bos: bool | None = None) -> list[list[int]]:
        """Encode many texts at once; `tokenizers` spreads them over all cores."""
        encodings = self.hf.encode_batch(list(texts), add_special_tokens=False)
        return [self._with_bos(e.ids, add_bos) for e in encodings]

    def _with_bos(self, ids: list[int], add_bos: bool | None) -> list[int]:
        # BOS is added here, not by a post-processor, so add_bos means the same for every tokenizer; never
        # twice, when the text already begins with it (chat templates that write `bos_token` themselves).
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None and ids[:1] != [self.bos_id]:
            return [self.bos_id, *ids]
        return ids

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.hf.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.hf.id_to_token(token_id)

    @functools.cached_property
    def fingerprint(self) -> str:
        """A short hash of the token -> id table: two tokenizers with the same fingerprint give token ids the
        same meaning (packed data and a model must agree on it; equal vocabulary sizes alone do not)."""
        vocab = sorted(self.hf.get_vocab(with_added_tokens=True).items(), key=lambda item: item[1])
        return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode("utf-8")).hexdigest()[:16]

    @functools.cached_property
    def fim(self) -> FimTokens | None:
        """The fill-in-the-middle sentinels of this tokenizer under any family's names (`FIM_NAMES`), or None.

        The one place that finds them: packing, `lmforge code` and the server's `suffix` all ask here, so an
        imported StarCoder or Qwen-Coder keeps the tokens it was trained with.
        """
        for names in FIM_NAMES:
            ids = [self.hf.token_to_id(name) for name in names]
            if all(i is not None for i in ids):
                stops = {self.hf.token_to_id(name) for name in FIM_STOPS} - {None}
                return FimTokens(*ids, names=names, stop_names=tuple(
                    name for name in FIM_STOPS if self.hf.token_to_id(name) in stops))
        return None

    def token_str(self, key: str) -> str | None:
        """The text of a special token named in tokenizer_config.json ("eos_token", "bos_token", ...)."""
        content = _token_content(self.config.get(key))
        if content is not None:
            return content
        token_id = {"eos_token": self.eos_id, "bos_token": self.bos_id, "pad_token": self.pad_id}.get(key)
        return None if token_id is None else self.hf.id_to_token(token_id)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **extra: Any) -> str:
        """Render `messages` with the Jinja chat template in the sandbox transformers uses.

        The template sees what transformers gives it (the special tokens by name, `raise_exception`,
        `strftime_now`, a `tojson` that keeps non-ASCII), so HF templates render the same text.
        """
        if self.chat_template is None:
            raise ConfigError(
                "this tokenizer has no chat_template in tokenizer_config.json; it cannot format chats"
            )
        specials = {key: self.token_str(key) for key in
                    ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")}
        from jinja2 import TemplateError

        try:
            return _compile_template(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt, tools=None, documents=None,
                **{k: v for k, v in specials.items() if v is not None}, **extra)
        except TemplateError as e:  # syntax errors, and the sandbox refusing unsafe access
            raise ConfigError(f"chat template: {e}") from None

    def chat_ids(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        """The conversation's token ids as transformers gives them: the rendered text, no BOS added
        (templates that want one write `bos_token` themselves)."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_bos=False)


@functools.lru_cache(maxsize=16)
def _compile_template(template: str) -> Any:
    from datetime import datetime

    from jinja2 import nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """`{% generation %}…{% endgeneration %}` marks assistant text for masks; rendering keeps the body."""

        tags = frozenset({"generation"})

        def parse(self, parser: Any) -> nodes.Node:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return caller()

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = _raise_template_error
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def _read_json_object(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: malformed JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def _wordpiece(vocab: Path, config: dict[str, Any]) -> HFTokenizer:
    """BERT's WordPiece (Wu et al. 2016) from vocab.txt, with its normaliser and [CLS] … [SEP] template."""
    from tokenizers.implementations import BertWordPieceTokenizer

    lowercase = bool(config.get("do_lower_case", True))
    strip_accents = config.get("strip_accents")
    return BertWordPieceTokenizer(str(vocab), lowercase=lowercase,
                                  strip_accents=lowercase if strip_accents is None else strip_accents,
                                  handle_chinese_chars=bool(config.get("tokenize_chinese_chars", True)))._tokenizer


def _raise_template_error(message: str) -> None:
    raise ConfigError(f"chat template: {message}")


class IncrementalDecoder:
    """Turn a stream of token ids into text pieces that never split a multi-byte UTF-8 character.

    A byte-level token can be half of a character; decoding it alone gives U+FFFD. So decode the ids
    since the last emitted piece, with the previous piece as left context (tokenizers that strip a
    leading space need it), hold back while the result ends in U+FFFD, and emit only the new suffix.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def _decode(self, start: int, end: int | None = None) -> str:
        return self.tokenizer.decode(self.ids[start:end], skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        prefix_text = self._decode(self._prefix, self._read)
        text = self._decode(self._prefix)
        if len(text) > len(prefix_text) and not text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """Emit whatever is held back (an incomplete character at the very end decodes to U+FFFD)."""
        prefix_text = self._decode(self._prefix, self._read)
        text = self._decode(self._prefix)
        self._prefix = self._read = len(self.ids)
        return text[len(prefix_text) :]
