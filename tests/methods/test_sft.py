"""SFT data: formats and their errors, assistant-only loss masks, packing that keeps examples apart."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import random_gpt

from lmforge.data.sft import Example, encode_chat, load_sft, to_example
from lmforge.errors import DataError
from lmforge.methods.sft import sft_block_size
from lmforge.train.loaders import SFTLoader
from lmforge.train.losses import IGNORE_INDEX, block_diagonal_mask, sft_loss

CONVERSATION = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is the cat on?"},
    {"role": "assistant", "content": "The mat."},
    {"role": "user", "content": "And the dog?"},
    {"role": "assistant", "content": "It sat on the mat while the cat slept."},
]


def write_rows(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def expected_mask(tokenizer, messages, last_only: bool) -> list[bool]:
    """Independently of the offsets: tokenise growing prefixes of the render, and mark the tokens a reply adds."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    mask = [False] * len(tokenizer.encode(text, add_bos=False))
    turns = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    for k in turns[-1:] if last_only else turns:
        start = len(tokenizer.encode(tokenizer.apply_chat_template(messages[:k], add_generation_prompt=True),
                                     add_bos=False))
        end = len(tokenizer.encode(tokenizer.apply_chat_template(messages[:k + 1], add_generation_prompt=False)
                                   .rstrip(), add_bos=False))
        mask[start:end] = [True] * (end - start)
    return mask


@pytest.mark.parametrize("train_on", ["all", "last"])
def test_mask_covers_exactly_the_assistant_replies(tiny_tokenizer, train_on):
    """Token by token: only reply tokens and their <|im_end|> are targets; system, user and headers are not."""
    example = encode_chat(tiny_tokenizer, CONVERSATION, train_on)
    assert example.ids == tiny_tokenizer.encode(tiny_tokenizer.apply_chat_template(CONVERSATION, False), add_bos=False)
    assert example.trained == expected_mask(tiny_tokenizer, CONVERSATION, last_only=train_on == "last")
    trained_runs, run = [], []
    for token, trained in zip(example.ids, example.trained):
        if trained:
            run.append(token)
        elif run:
            trained_runs.append(tiny_tokenizer.decode(run))
            run = []
    replies = ["The mat.<|im_end|>", "It sat on the mat while the cat slept.<|im_end|>"]
    assert trained_runs == (replies if train_on == "all" else replies[-1:])


def test_formats_become_the_same_conversation():
    """OpenAI messages, ShareGPT conversations and Alpaca rows become role/content turns; prompt/completion a pair."""
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    openai = to_example({"messages": turns}, "f:1")
    sharegpt = to_example({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}, "f:2")
    alpaca = to_example({"instruction": "hi", "input": "", "output": "yo"}, "f:3")
    assert openai == sharegpt == alpaca == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    with_input = to_example({"instruction": "Translate", "input": "chat", "output": "cat"}, "f:4")
    assert with_input[0]["content"] == "Translate\n\nchat"
    assert to_example({"prompt": "2+2=", "completion": "4"}, "f:5") == ("2+2=", "4")


def test_completion_trains_on_completion_and_eos_only(tmp_path, tiny_tokenizer):
    path = write_rows(tmp_path / "pc.jsonl", [{"prompt": "the cat sat on", "completion": " the mat"}])
    (example,) = load_sft(path, tiny_tokenizer)
    n_prompt = len(tiny_tokenizer.encode("the cat sat on"))
    assert example.trained == [False] * n_prompt + [True] * (len(example.ids) - n_prompt)
    assert example.ids[-1] == tiny_tokenizer.eos_id


@pytest.mark.parametrize(("row", "message"), [
    ({"messages": [{"role": "user", "content": "hi"}]}, "sft.jsonl:2: no assistant turn"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "sft.jsonl:2: messages[0] has role 'robot'"),
    ({"conversations": [{"from": "alien", "value": "hi"}]}, "sft.jsonl:2: conversations[0] has from='alien'"),
    ({"instruction": "hi", "output": 3}, "sft.jsonl:2: field 'output' is a int"),
    ({"text": "plain"}, "sft.jsonl:2: not an SFT example"),
])
def test_bad_rows_name_file_and_line(tmp_path, tiny_tokenizer, row, message):
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    path = write_rows(tmp_path / "sft.jsonl", [good, row])
    with pytest.raises(DataError, match=re.escape(message)):
        load_sft(path, tiny_tokenizer)


def packed_examples(tokenizer) -> list[Example]:
    convs = [CONVERSATION, CONVERSATION[1:3], [{"role": "user", "content": "Say a word."},
                                              {"role": "assistant", "content": "Token."}]]
    return [encode_chat(tokenizer, c) for c in convs]


@pytest.mark.parametrize("name", ["llama-tiny", "gpt2-tiny"])
def test_packed_example_has_the_logits_it_has_alone(tiny_tokenizer, name):
    """Block-diagonal mask + positions restarting at 0: every example's logits match a forward pass on it alone
    (RoPE and learned positions both)."""
    model = random_gpt(name, tiny_tokenizer.vocab_size, num_hidden_layers=2)
    examples = packed_examples(tiny_tokenizer)
    block = sum(len(e.ids) - 1 for e in examples) + 5  # room for all three and some padding
    loader = SFTLoader(examples, block_size=block, batch_size=1, pad_id=tiny_tokenizer.pad_id, shuffle=False)
    assert loader._windows() == [[0, 1, 2]]  # all three share one window
    x, y = loader.next_batch()
    with torch.no_grad():
        packed = model(x["input_ids"], positions=x["positions"], attention_mask=block_diagonal_mask(x["segments"]))
        at = 0
        for seg, example in enumerate(examples, start=1):
            n = len(example.ids) - 1
            assert (x["segments"][0, at:at + n] == seg).all() and x["positions"][0, at] == 0
            alone = model(torch.tensor([example.ids[:-1]]))
            torch.testing.assert_close(packed[0, at:at + n], alone[0], atol=1e-4, rtol=1e-4)  # fp32 kernel noise
            at += n
    assert (y[0, at:] == IGNORE_INDEX).all()  # padding is never a target


def test_packed_examples_keep_a_sliding_window(tiny_tokenizer):
    """A Mistral-style model with a 4-token window: packed, each example attends as it would alone (within its
    own last 4 positions), so its logits and summed loss are those of the example alone."""
    model = random_gpt("llama-tiny", tiny_tokenizer.vocab_size, num_hidden_layers=2, sliding_window=4)
    examples = packed_examples(tiny_tokenizer)
    block = sum(len(e.ids) - 1 for e in examples) + 5
    x, y = SFTLoader(examples, block_size=block, batch_size=1, pad_id=tiny_tokenizer.pad_id, shuffle=False).next_batch()
    with torch.no_grad():
        mask = block_diagonal_mask(x["segments"], window=4)
        packed = model(x["input_ids"], positions=x["positions"], attention_mask=mask)
        at, alone_loss = 0, 0.0
        for example in examples:
            n = len(example.ids) - 1
            ids = torch.tensor([example.ids[:-1]])
            torch.testing.assert_close(packed[0, at:at + n], model(ids)[0], atol=1e-4, rtol=1e-4)
            alone_loss += sft_loss(model, {"input_ids": ids, "positions": torch.arange(n)[None],
                                           "segments": torch.ones(1, n, dtype=torch.long)}, y[:, at:at + n])[0]
            at += n
        assert sft_loss(model, x, y)[0].item() == pytest.approx(alone_loss.item(), rel=1e-5)  # reads the window


def test_default_sft_block_size_fits_the_longest_example_in_steps_of_64():
    """Not the model's context (a [B, 1, T, T] mask of 1 GiB a row at 32k): the data's longest, bucketed."""
    examples = [Example(list(range(n)), [True] * n) for n in (10, 70, 30)]
    assert sft_block_size(examples, context=4096) == 128  # 69 predicted tokens → 128
    assert sft_block_size(examples[:1], context=4096) == 64
    assert sft_block_size(examples, context=100) == 100  # never past the context


def test_targets_are_next_tokens_where_trained(tiny_tokenizer):
    (example,) = packed_examples(tiny_tokenizer)[:1]
    loader = SFTLoader([example], block_size=128, batch_size=1, pad_id=tiny_tokenizer.pad_id, shuffle=False)
    _, y = loader.next_batch()
    n = len(example.ids) - 1
    expected = [t if trained else IGNORE_INDEX for t, trained in zip(example.ids[1:], example.trained[1:])]
    assert y[0, :n].tolist() == expected


def test_loader_state_resumes_at_the_same_batch(tiny_tokenizer):
    examples = packed_examples(tiny_tokenizer) * 8
    a = SFTLoader(examples, block_size=128, batch_size=2, pad_id=0, seed=3)
    for _ in range(5):
        a.next_batch()
    b = SFTLoader(examples, block_size=128, batch_size=2, pad_id=0, seed=3)
    b.load_state_dict(a.state_dict())
    for _ in range(4):
        (xa, ya), (xb, yb) = a.next_batch(), b.next_batch()
        assert torch.equal(xa["input_ids"], xb["input_ids"]) and torch.equal(ya, yb)


def test_compressed_sft_data_loads_like_plain(tmp_path, tiny_tokenizer):
    """SFT data may be .jsonl.gz (the shared row reader decompresses it): the same examples as the plain file."""
    import gzip

    text = "".join(json.dumps({"prompt": f"{i}+{i}?", "completion": str(2 * i)}) + "\n" for i in range(3))
    (tmp_path / "a.jsonl").write_text(text)
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.write(text)
    assert load_sft(tmp_path / "a.jsonl.gz", tiny_tokenizer) == load_sft(tmp_path / "a.jsonl", tiny_tokenizer)
