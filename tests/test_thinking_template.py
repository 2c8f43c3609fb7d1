"""A Thinking checkpoint: its own chat template (the generation prompt opens ``<think>``)
drives the runtime, and ``<think>``/``</think>`` (added, non-special tokens, as in Qwen3's
tokenizer) are streamed as generated, not dropped as special tokens."""

from __future__ import annotations

import json
import os

import pytest

from qwen3vl_compile import Pipeline
from qwen3vl_compile.model.checkpoint import resolve_model_source
from qwen3vl_compile.cli import main as compile_main
from qwen3vl_compile.model.hf_reference import make_hf_generate

THINKING_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}{%- else %}"
    "{%- for item in message['content'] %}"
    "{%- if item['type'] == 'image' %}{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif item['type'] == 'text' %}{{- item['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n<think>\\n' }}{%- endif %}"
)


@pytest.fixture(scope="module")
def thinking_checkpoint(tmp_path_factory):
    from tokenizers import AddedToken, Tokenizer

    src = resolve_model_source("tiny-random")
    d = tmp_path_factory.mktemp("thinking") / "Qwen3-VL-Tiny-Thinking"
    d.mkdir()
    for f in src.iterdir():
        if f.name not in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            os.symlink(f, d / f.name)
    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    # Qwen3's added tokens after the vision ones, <think> and </think> last, not special.
    names = [f"<|placeholder_{i}|>" for i in range(tok.get_vocab_size(), 151667)] + ["<think>", "</think>"]
    tok.add_tokens([AddedToken(n, special=False, normalized=False) for n in names])
    tok.save(str(d / "tokenizer.json"))
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    (d / "chat_template.jinja").write_text(THINKING_TEMPLATE)
    assert tok.token_to_id("<think>") == 151667 and tok.token_to_id("</think>") == 151668
    return d


@pytest.fixture(scope="module")
def bundle(thinking_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("b") / "bundle"
    assert compile_main(["--model", str(thinking_checkpoint), "--graphs", "embedding,decoder", "--precision", "fp32",
                         "-o", str(out), "-q"]) == 0
    return out


def test_the_checkpoints_template_drives_the_prompt(bundle, thinking_checkpoint):
    from transformers import AutoTokenizer

    pipe = Pipeline.load(bundle)
    ours = pipe.chat.encode("Why is the sky blue?").reshape(-1).tolist()
    hf = AutoTokenizer.from_pretrained(thinking_checkpoint)
    ref = hf.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "Why is the sky blue?"}]}],
                                 add_generation_prompt=True, tokenize=True)
    ref = ref["input_ids"] if isinstance(ref, dict) or hasattr(ref, "keys") else ref
    assert ours == list(ref) and ours[-2:] == [151667, hf.convert_tokens_to_ids("Ċ")]


@pytest.mark.slow  # Hugging Face generate
def test_greedy_tokens_equal_hf_and_think_tags_are_text(bundle, thinking_checkpoint):
    ref = make_hf_generate(thinking_checkpoint)([], "Why is the sky blue?", 24)
    pipe = Pipeline.load(bundle)
    got = pipe.generate(images=[], prompt="Why is the sky blue?", max_new_tokens=24)
    assert got.token_ids == ref
    assert pipe.chat.decode([151667, 151668]) == "<think></think>"
    from qwen3vl_compile.runtime.chat import iter_pieces

    hello = pipe.chat.tokenizer.encode("Hello", add_special_tokens=False).ids
    pieces = list(iter_pieces(pipe.chat.stream(), [151667, *hello, 151668]))
    assert "".join(pieces) == "<think>Hello</think>" and pieces[0] == "<think>"
