"""Prompt ids without transformers equal Hugging Face's tokenizer + template + pad expansion."""

import pytest

from qwen3vl_compile.runtime.chat import ChatFormatter, iter_pieces

PAD = "<|image_pad|>"


@pytest.fixture(scope="module")
def fmt(tiny_path):
    return ChatFormatter(tiny_path)


@pytest.fixture(scope="module")
def hf_tok(tiny_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_path)


def _hf_ids(tok, prompt, counts, system=None):
    content = [{"type": "image"} for _ in counts] + [{"type": "text", "text": prompt}]
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    # Qwen3VLProcessor's expansion: each pad becomes grid.prod() // merge**2 pads, in order.
    parts = text.split(PAD)
    text = parts[0] + "".join(PAD * n + p for n, p in zip(counts, parts[1:]))
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize(
    "prompt, counts, system",
    [
        ("Describe this image.", [], None),
        ("What is in the picture?", [64], None),
        ("Compare these two images, please.", [196, 48], "You are a careful assistant."),
        ("Émojis and ünïcode: 日本語 ✓", [16], None),
    ],
)
def test_ids_equal_hugging_face(fmt, hf_tok, prompt, counts, system):
    ours = fmt.encode(prompt, counts, system)[0].tolist()
    assert ours == _hf_ids(hf_tok, prompt, counts, system)
    assert ours.count(fmt.image_pad_id) == sum(counts)


def test_stop_ids(fmt):
    assert {151645, 151643} <= fmt.stop_ids


def test_streaming_equals_whole_decode(fmt, hf_tok):
    text = "Un café, s'il vous plaît — 日本語のテキスト ✓ 42"
    ids = hf_tok(text, add_special_tokens=False)["input_ids"]
    pieces = list(iter_pieces(fmt.stream(), ids))
    assert "".join(pieces) == hf_tok.decode(ids, skip_special_tokens=True) == fmt.decode(ids)
    assert len(pieces) > 3
