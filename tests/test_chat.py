"""Prompt ids without transformers against Hugging Face: the real Qwen3VLProcessor (its
video processor left out, which needs torchvision) for ids and mm_token_type_ids,
``apply_chat_template`` for rendering, ``tokenizer.decode`` for streaming."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from qwen3vl_compile.errors import BundleError, RuntimeInputError
from qwen3vl_compile.runtime.chat import ChatFormatter, build_messages, iter_pieces
from qwen3vl_compile.runtime.preprocess import ProcessorConfig, preprocess

# A template of our own that leans on what Hugging Face's environment provides: block
# trimming (no "-" markers anywhere), namespace, loop controls, tojson without HTML escaping,
# the special-token variables, dict(), strftime_now, raise_exception and {% generation %}.
RICH_TEMPLATE = """{% set ns = namespace(images=0) %}
{% set year = strftime_now("%Y") %}
{% if messages[0].role != 'system' %}
<|im_start|>system
Default system text ({{ year }}).{{ eos_token }}
{% endif %}
{% for m in messages %}
    {% if m.role not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('unknown role ' + m.role) }}
    {% endif %}
<|im_start|>{{ m.role }}
    {% if m.content is string %}
{{ m.content }}
    {% else %}
        {% for c in m.content %}
            {% if c.type == 'image' %}
                {% set ns.images = ns.images + 1 %}
Picture {{ ns.images }}: <|vision_start|><|image_pad|><|vision_end|>
                {% continue %}
            {% endif %}
{{ c.text | tojson }}
            {% if loop.last %}{% break %}{% endif %}
        {% endfor %}
    {% endif %}
<|im_end|>
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% generation %}{% endgeneration %}
{% endif %}
{{ dict(n=ns.images, pad=pad_token, tools=tools) | tojson }}"""


@pytest.fixture(scope="module")
def fmt(tiny_path):
    return ChatFormatter(tiny_path)


@pytest.fixture(scope="module")
def hf_tok(tiny_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_path)


@pytest.fixture(scope="module")
def cfg(tiny_path):
    return ProcessorConfig.from_dict(json.loads((tiny_path / "preprocessor_config.json").read_text()))


@pytest.fixture(scope="module")
def hf_processor(tiny_path, hf_tok):
    """Hugging Face's own Qwen3VLProcessor, built without a video processor: only the class
    check of that missing argument is skipped, every image/text code path is the real one."""
    from transformers import Qwen2VLImageProcessorPil
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    class ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
        def check_argument_for_proper_class(self, name, arg):
            if name == "video_processor" and arg is None:
                return None
            return super().check_argument_for_proper_class(name, arg)

    values = json.loads((tiny_path / "preprocessor_config.json").read_text())
    kwargs = {k: v for k, v in values.items() if k not in ("image_processor_type", "processor_class")}
    template = (tiny_path / "chat_template.jinja").read_text()
    return ImageOnlyQwen3VLProcessor(
        image_processor=Qwen2VLImageProcessorPil(**kwargs), tokenizer=hf_tok, video_processor=None, chat_template=template
    )


def _images(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


@pytest.mark.parametrize(
    "prompt, sizes, system",
    [
        ("Describe this image.", [], None),
        ("What is in the picture?", [(500, 375)], None),
        ("Compare these two images, please.", [(448, 448), (224, 224)], "You are a careful assistant."),
        ("Two more: the tall one first.", [(37, 900), (1000, 300)], None),
        ("Émojis and ünïcode: 日本語 ✓ <b>&</b>", [(320, 240)], "Réponds en français."),
    ],
)
def test_inputs_equal_hf_processor(fmt, cfg, hf_processor, prompt, sizes, system):
    images = _images(sizes)
    grids = [preprocess(img, cfg).grid_thw for img in images]
    ours = fmt.build_inputs(prompt, grids, system, merge_size=cfg.merge_size)

    messages = build_messages(prompt, len(images), system)
    text = hf_processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ref = hf_processor(text=[text], images=images or None, return_tensors="np")
    assert ours.input_ids.dtype == np.int64 and ours.input_ids.shape == ref["input_ids"].shape
    np.testing.assert_array_equal(ours.input_ids, ref["input_ids"])
    np.testing.assert_array_equal(ours.mm_token_type_ids, ref["mm_token_type_ids"])
    if images:
        assert [list(g) for g in grids] == ref["image_grid_thw"].tolist()
    assert int((ours.mm_token_type_ids == 1).sum()) == sum(t * h * w // 4 for t, h, w in grids)
    np.testing.assert_array_equal(fmt.encode(prompt, [t * h * w // 4 for t, h, w in grids], system), ours.input_ids)


def _bundle_dir(tiny_path, tmp_path, template_files: dict):
    root = tmp_path / "bundle"
    root.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(tiny_path / name, root / name)
    for name, content in template_files.items():
        (root / name).write_text(content if isinstance(content, str) else json.dumps(content))
    return root


def test_rich_template_renders_like_apply_chat_template(tiny_path, tmp_path, hf_tok):
    fmt = ChatFormatter(_bundle_dir(tiny_path, tmp_path, {"chat_template.jinja": RICH_TEMPLATE}))
    for messages in (build_messages('Say "hi" <b>', 2), build_messages("Plain.", 0, system="Sys é")):
        ours = fmt.render(messages)
        ref = hf_tok.apply_chat_template(messages, chat_template=RICH_TEMPLATE, add_generation_prompt=True, tokenize=False)
        assert ours == ref
        assert fmt.render(messages, add_generation_prompt=False) == hf_tok.apply_chat_template(
            messages, chat_template=RICH_TEMPLATE, add_generation_prompt=False, tokenize=False
        )
    assert "Picture 2:" in fmt.render(build_messages("x", 2))
    bad = [{"role": "tool", "content": "x"}]
    with pytest.raises(BundleError, match="unknown role tool"):
        fmt.render(bad)
    with pytest.raises(Exception, match="unknown role tool"):
        hf_tok.apply_chat_template(bad, chat_template=RICH_TEMPLATE, tokenize=False)


@pytest.mark.parametrize(
    "files",
    [
        {"chat_template.json": "json"},
        {"tokenizer_config.json": "string"},
        {"tokenizer_config.json": "named"},
    ],
)
def test_template_sources_match_hf_loading(tiny_path, tmp_path, hf_tok, files):
    """tokenizer_config.json's template is what AutoTokenizer loads; chat_template.json is the
    processor's file (AutoTokenizer ignores it), so that one is compared by content."""
    from transformers import AutoTokenizer

    template = (tiny_path / "chat_template.jinja").read_text()
    kind = next(iter(files.values()))
    if kind == "json":
        content = {"chat_template.json": {"chat_template": template}}
    else:
        config = json.loads((tiny_path / "tokenizer_config.json").read_text())
        named = [{"name": "tool_use", "template": "x"}, {"name": "default", "template": template}]
        config["chat_template"] = template if kind == "string" else named
        content = {"tokenizer_config.json": config}
    root = _bundle_dir(tiny_path, tmp_path, content)
    messages = build_messages("Hello there.", 1, system="Be brief.")
    ours = ChatFormatter(root).render(messages)
    if kind == "json":
        ref = hf_tok.apply_chat_template(messages, chat_template=template, add_generation_prompt=True, tokenize=False)
    else:
        ref = AutoTokenizer.from_pretrained(root).apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert ours == ref and "<|image_pad|>" in ours


def test_missing_template_and_literal_pads(tiny_path, tmp_path, fmt):
    with pytest.raises(BundleError, match="no chat template"):
        ChatFormatter(_bundle_dir(tiny_path, tmp_path, {}))
    with pytest.raises(RuntimeInputError, match="literal"):
        fmt.encode("what is <|image_pad|> here", [4])


def test_stop_ids(tiny_path, tmp_path, fmt):
    from transformers import GenerationConfig

    eos = GenerationConfig.from_pretrained(tiny_path).eos_token_id
    assert fmt.stop_ids == {151645, 151643} | set(eos if isinstance(eos, list) else [eos])
    root = _bundle_dir(tiny_path, tmp_path, {"chat_template.jinja": "x"})
    (root / "generation_config.json").write_text(json.dumps({"eos_token_id": 77}))
    assert ChatFormatter(root).stop_ids == {77, 151645, 151643}


def test_streaming_equals_whole_decode(fmt, hf_tok):
    text = "Un café, s'il vous plaît — 日本語のテキスト ✓ 42 🙂"
    ids = hf_tok(text, add_special_tokens=False)["input_ids"]
    ids = ids[:10] + [151645, 151652] + ids[10:]  # special tokens in the middle are skipped
    # The tiny tokenizer splits these characters into byte tokens: some ids alone are not UTF-8.
    assert any("\ufffd" in hf_tok.decode([i]) for i in ids)
    pieces = list(iter_pieces(fmt.stream(), ids))
    assert "".join(pieces) == hf_tok.decode(ids, skip_special_tokens=True) == fmt.decode(ids)
    assert len(pieces) > 5 and not any("\ufffd" in p for p in pieces)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_streaming_random_ids(fmt, hf_tok, seed):
    """Arbitrary id sequences, invalid UTF-8 included, still add up to the whole decode."""
    rng = np.random.default_rng(seed)
    ids = [int(i) for i in rng.integers(0, 1024, 300)] + [151645]  # the tiny BPE's trained ids
    whole = hf_tok.decode(ids, skip_special_tokens=True)
    assert "\ufffd" in whole  # stray continuation bytes: invalid UTF-8 is part of the test
    assert "".join(iter_pieces(fmt.stream(), ids)) == whole
