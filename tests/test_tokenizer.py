"""Byte-level BPE: exact round trips, special tokens, HF files, streaming decode, chat template."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors

from lmforge.errors import CheckpointError, ConfigError, DataError
from lmforge.tokenizer import (
    BOS,
    EOS,
    IM_END,
    IM_START,
    PAD,
    SPECIAL_TOKENS,
    IncrementalDecoder,
    Tokenizer,
    train_tokenizer,
)

ENGLISH = "The quick brown fox jumps over the lazy dog. It was the best of times, it was the worst of times."
CODE = 'def add(a, b):\n    """Sum."""\n    return a + b\n\nfor i in range(10):\n\tprint(f"{i=}")  # loop\n'
CJK = "你好，世界。日本語のテキストです。한국어 문장입니다。漢字とかなカナ。"
EMOJI = "🙂🚀 family: 👨‍👩‍👧 flags: 🇯🇵 skin: 👍🏽 ✨"
hypothesis_settings = settings(deadline=None, max_examples=150)


def write_corpus(directory: Path, n: int = 60) -> Path:
    rng = random.Random(0)
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "mixed.jsonl", "w", encoding="utf-8") as f:
        for _ in range(n):
            parts = rng.sample([ENGLISH, CODE, CJK, EMOJI], k=rng.randint(1, 4))
            f.write(json.dumps({"text": "\n".join(parts)}, ensure_ascii=False) + "\n")
    (directory / "code.py.txt").write_text(CODE * 5, encoding="utf-8")
    return directory


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    root = tmp_path_factory.mktemp("tok")
    out = train_tokenizer(write_corpus(root / "corpus"), root / "tok", vocab_size=400)
    return Tokenizer.load(out)


@pytest.fixture(scope="module")
def bytes_only(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    """No merges beyond the 256 bytes: every CJK character or emoji spans several tokens."""
    root = tmp_path_factory.mktemp("bytes")
    out = train_tokenizer(write_corpus(root / "corpus"), root / "tok", vocab_size=256 + len(SPECIAL_TOKENS))
    return Tokenizer.load(out)


no_surrogates = st.characters(exclude_categories=("Cs",))
cjk_emoji = st.text(
    alphabet=st.one_of(
        st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF),
        st.characters(min_codepoint=0x3040, max_codepoint=0x30FF),
        st.characters(min_codepoint=0xAC00, max_codepoint=0xD7A3),
        st.characters(min_codepoint=0x1F300, max_codepoint=0x1FAFF),
        st.sampled_from(["\u200d", "\ufe0f", "\U0001f3fd", " ", "。", "\n"]),
    )
)
code_like = st.lists(
    st.sampled_from(
        [
            "def",
            "return",
            " ",
            "    ",
            "\t",
            "\n",
            "\r\n",
            "(",
            ")",
            ":",
            "==",
            "'",
            '"',
            "#",
            "x",
            "_",
            "0",
            "{}",
            "\\",
        ]
    )
).map("".join)


@hypothesis_settings
@given(st.text(alphabet=no_surrogates))
def test_roundtrip_any_text(tok: Tokenizer, text: str) -> None:
    """decode(encode(s)) == s for any string: no unknown token, no normalization, no prefix space."""
    assert tok.decode(tok.encode(text)) == text


@hypothesis_settings
@given(cjk_emoji)
def test_roundtrip_cjk_and_emoji(tok: Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text)) == text


@hypothesis_settings
@given(code_like)
def test_roundtrip_code(tok: Tokenizer, text: str) -> None:
    """Indentation, tabs and CRLF survive, which code models depend on."""
    assert tok.decode(tok.encode(text)) == text


def test_special_tokens_are_ids_0_to_4_and_single_tokens(tok: Tokenizer) -> None:
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    for token_id, token in enumerate(SPECIAL_TOKENS):
        assert tok.encode(token) == [token_id]
    assert (tok.eos_id, tok.pad_id, tok.bos_id) == (0, 1, 2)
    assert [tok.token_to_id(t) for t in (EOS, PAD, BOS, IM_START, IM_END)] == [0, 1, 2, 3, 4]
    assert tok.vocab_size == tok.hf.get_vocab_size(with_added_tokens=True)


def test_add_bos_prepends_bos_only_when_asked(tok: Tokenizer) -> None:
    assert not tok.add_bos
    assert tok.encode("hi", add_bos=True) == [tok.bos_id, *tok.encode("hi")]
    assert tok.encode_batch(["hi", "你好"]) == [tok.encode("hi"), tok.encode("你好")]


def test_vocab_size_below_bytes_plus_specials_is_refused(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "corpus")
    with pytest.raises(ConfigError, match=r"vocab_size=100.*261"):
        train_tokenizer(corpus, tmp_path / "tok", vocab_size=100)
    assert not (tmp_path / "tok").exists()


def test_save_load_gives_identical_ids(tok: Tokenizer, tmp_path: Path) -> None:
    tok.save(tmp_path / "copy")
    again = Tokenizer.load(tmp_path / "copy")
    text = ENGLISH + CODE + CJK + EMOJI
    assert again.encode(text) == tok.encode(text)
    assert (again.vocab_size, again.eos_id, again.bos_id, again.pad_id) == (
        tok.vocab_size,
        tok.eos_id,
        tok.bos_id,
        tok.pad_id,
    )
    assert again.chat_template == tok.chat_template


def gpt2_style(directory: Path, with_config: bool) -> HFTokenizer:
    """A GPT-2-shaped tokenizer.json: byte alphabet, a few merges, <|endoftext|> as the last id."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([EOS])
    directory.mkdir(parents=True)
    hf.save(str(directory / "tokenizer.json"))
    if with_config:
        config = {"bos_token": {"content": EOS, "lstrip": False}, "eos_token": EOS, "pad_token": None}
        (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return hf


def test_loads_gpt2_style_tokenizer_json_without_config(tmp_path: Path) -> None:
    hf = gpt2_style(tmp_path / "gpt2", with_config=False)
    tok = Tokenizer.load(tmp_path / "gpt2")
    assert tok.eos_id == hf.token_to_id(EOS) == 259
    assert tok.bos_id is None and tok.pad_id is None and tok.chat_template is None
    assert tok.vocab_size == 260
    text = "the theme of the day: 🙂"
    assert tok.encode(text) == hf.encode(text).ids
    assert tok.encode(" the") == [258]
    assert tok.decode(tok.encode(text)) == text


def test_special_tokens_resolve_from_config_strings_or_dicts(tmp_path: Path) -> None:
    gpt2_style(tmp_path / "gpt2", with_config=True)
    tok = Tokenizer.load(tmp_path / "gpt2")
    assert tok.bos_id == tok.eos_id == 259
    assert tok.pad_id is None


def test_bos_added_by_the_post_processor_is_honoured_once(tmp_path: Path) -> None:
    """Llama 3 style: tokenizer.json prepends BOS and tokenizer_config.json has no add_bos_token."""
    hf = gpt2_style(tmp_path / "llama", with_config=False)
    hf.add_special_tokens([BOS])
    bos = hf.token_to_id(BOS)
    hf.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, bos)])
    hf.save(str(tmp_path / "llama" / "tokenizer.json"))
    tok = Tokenizer.load(tmp_path / "llama")
    assert tok.add_bos and tok.bos_id == bos
    assert (
        tok.encode("the theme")
        == hf.encode("the theme").ids
        == [bos, *tok.encode("the theme", add_bos=False)]
    )
    tok.save(tmp_path / "copy")
    assert Tokenizer.load(tmp_path / "copy").encode("the theme") == tok.encode("the theme")


def test_missing_directory_is_a_checkpoint_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="nowhere"):
        Tokenizer.load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"no tokenizer\.json"):
        Tokenizer.load(tmp_path / "empty")


def stream(tok: Tokenizer, ids: list[int], skip_special_tokens: bool = True) -> list[str]:
    decoder = IncrementalDecoder(tok, skip_special_tokens=skip_special_tokens)
    return [*(decoder.push(i) for i in ids), decoder.flush()]


def test_incremental_decoder_never_splits_a_character(bytes_only: Tokenizer) -> None:
    text = "naïve 你好 🙂 👨‍👩‍👧 end"
    ids = bytes_only.encode(text)
    assert len(ids) == len(text.encode("utf-8"))
    pieces = stream(bytes_only, ids)
    assert "".join(pieces) == bytes_only.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)
    assert "你" in pieces and "🙂" in pieces


@hypothesis_settings
@given(st.text(alphabet=no_surrogates))
def test_incremental_decoder_pieces_concatenate_to_full_decode(bytes_only: Tokenizer, text: str) -> None:
    ids = bytes_only.encode(text)
    pieces = stream(bytes_only, ids)
    assert "".join(pieces) == bytes_only.decode(ids, skip_special_tokens=True)
    if "\ufffd" not in text:
        assert not any("\ufffd" in p for p in pieces)


def test_incremental_decoder_skips_or_keeps_special_tokens(tok: Tokenizer) -> None:
    ids = [*tok.encode("你好"), tok.eos_id, *tok.encode(" 🙂")]
    assert "".join(stream(tok, ids)) == "你好 🙂"
    assert "".join(stream(tok, ids, skip_special_tokens=False)) == f"你好{EOS} 🙂"


def test_incremental_decoder_flushes_an_incomplete_character(bytes_only: Tokenizer) -> None:
    ids = bytes_only.encode("a你")[:-1]
    pieces = stream(bytes_only, ids)
    assert pieces[0] == "a" and "".join(pieces) == bytes_only.decode(ids)


CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hi 🙂"},
    {"role": "assistant", "content": "hello"},
]


def test_chat_template_renders_chatml(tok: Tokenizer) -> None:
    expected = (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nhi 🙂<|im_end|>\n"
        "<|im_start|>assistant\nhello<|im_end|>\n"
    )
    assert tok.apply_chat_template(CHAT, add_generation_prompt=False) == expected
    assert tok.apply_chat_template(CHAT) == expected + "<|im_start|>assistant\n"
    ids = tok.encode(tok.apply_chat_template(CHAT[:1], add_generation_prompt=False))
    assert ids[0] == tok.token_to_id(IM_START) and tok.token_to_id(IM_END) in ids


def test_transformers_loads_trained_tokenizer_identically(tok: Tokenizer, tmp_path: Path) -> None:
    """The files are HF format: transformers gives the same ids, decode and chat rendering."""
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path / "tok")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    text = CODE + CJK + EMOJI
    assert hf(text)["input_ids"] == tok.encode(text)
    assert hf.decode(tok.encode(text)) == text
    rendered = hf.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert rendered == tok.apply_chat_template(CHAT)
    assert (hf.eos_token_id, hf.pad_token_id, hf.bos_token_id) == (tok.eos_id, tok.pad_id, tok.bos_id)


def test_chat_template_missing_is_a_config_error(tmp_path: Path) -> None:
    gpt2_style(tmp_path / "gpt2", with_config=False)
    with pytest.raises(ConfigError, match="chat_template"):
        Tokenizer.load(tmp_path / "gpt2").apply_chat_template(CHAT)


def test_bad_jsonl_line_names_file_and_line(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"text": broken}\n', encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(f"{corpus}:3: invalid JSON")):
        train_tokenizer(corpus, tmp_path / "tok", vocab_size=300)
    assert not (tmp_path / "tok").exists()


def _same_corpus_in_every_format(root: Path) -> dict[str, Path]:
    """write_corpus's JSONL documents (quotes, commas, newlines, CJK, emoji) as JSONL, CSV, TSV and Parquet."""
    import csv
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = write_corpus(root / "jsonl") / "mixed.jsonl"
    docs = [json.loads(line)["text"] for line in jsonl.read_text(encoding="utf-8").splitlines()]
    paths = {"jsonl": jsonl, "csv": root / "mixed.csv", "tsv": root / "mixed.tsv", "parquet": root / "mixed.parquet",
             "csv.gz": root / "mixed.csv.gz"}
    for fmt, delimiter in (("csv", ","), ("tsv", "\t")):
        with open(paths[fmt], "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f, delimiter=delimiter)
            writer.writerow(["text", "source"])
            writer.writerows([d, "gen"] for d in docs)
    paths["csv.gz"].write_bytes(gzip.compress(paths["csv"].read_bytes()))
    pq.write_table(pa.table({"source": ["gen"] * len(docs), "text": docs}), paths["parquet"])
    return paths


def test_csv_tsv_parquet_and_gz_train_the_tokenizer_of_the_same_jsonl(tmp_path: Path) -> None:
    """Every format is read as its text column: no CSV header, quotes or other columns leak into the vocabulary."""
    paths = _same_corpus_in_every_format(tmp_path)
    trained = {fmt: train_tokenizer(path, tmp_path / f"tok-{fmt}", vocab_size=400) for fmt, path in paths.items()}
    expected = (trained["jsonl"] / "tokenizer.json").read_text(encoding="utf-8")
    for fmt in ("csv", "tsv", "parquet", "csv.gz"):
        assert (trained[fmt] / "tokenizer.json").read_text(encoding="utf-8") == expected, fmt
    vocab = Tokenizer.load(trained["csv"]).hf.get_vocab()
    assert not any("source" in piece or "gen" in piece for piece in vocab)


def test_a_clean_folder_and_a_glob_select_what_the_tokenizer_reads(tmp_path: Path) -> None:
    from lmforge.data.clean import Normalize
    from lmforge.data.filters import Filters
    from lmforge.data.pipeline import clean

    corpus = write_corpus(tmp_path / "corpus")
    (corpus / "notes.md").write_text("zzzz qqqq " * 50, encoding="utf-8")
    clean(corpus / "mixed.jsonl", tmp_path / "cleaned", filters=Filters(enabled=False), pii=False,
          exact_dedup=False, normalize=Normalize(unicode=None, fix_mojibake=False, control_chars=False,
                                                 whitespace=False), progress=False)
    direct = train_tokenizer(corpus / "mixed.jsonl", tmp_path / "direct", vocab_size=400)
    for name, data, glob in (("globbed", corpus, "*.jsonl"), ("cleaned", tmp_path / "cleaned", None)):
        out = train_tokenizer(data, tmp_path / f"tok-{name}", vocab_size=400, glob=glob)
        assert (out / "tokenizer.json").read_bytes() == (direct / "tokenizer.json").read_bytes(), name


def test_missing_csv_column_names_file_and_line(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.csv"
    corpus.write_text("title,body\nA,some text\n", encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(f"{corpus}:1: column 'text' missing")):
        train_tokenizer(corpus, tmp_path / "tok", vocab_size=300)
    assert not (tmp_path / "tok").exists()
