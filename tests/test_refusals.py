"""Checkpoints the graphs cannot express, or whose files are broken, are refused at load:
one line naming the config field and value (or the file), a non-zero exit, nothing written,
before any model weight is read."""

from __future__ import annotations

import json
import os

import pytest

from qwen3vl_compile.model.checkpoint import resolve_model_source
from qwen3vl_compile.cli import main


def _copy(src, dst, edit=None):
    """A checkpoint directory: config.json (edited) copied, the rest linked."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name != "config.json":
            os.symlink(f, dst / f.name)
    config = json.loads((src / "config.json").read_text())
    if edit:
        edit(config)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def _text(**kw):
    return lambda c: c["text_config"].update(kw)


def _rope(**kw):
    return lambda c: c["text_config"]["rope_parameters"].update(kw)


def _drop_text(field):
    return lambda c: c["text_config"].pop(field)


CONFIG_CASES = {
    "attention_bias": ("tiny-random", _text(attention_bias=True), 2, "text_config.attention_bias: true is not supported"),
    "hidden_act": ("tiny-random", _text(hidden_act="gelu"), 2, "text_config.hidden_act: 'gelu' is not supported"),
    "rope_type": ("tiny-random", _rope(rope_type="yarn"), 2, "rope_type: 'yarn' is not supported"),
    "mrope_not_interleaved": ("tiny-random", _rope(mrope_interleaved=False), 2, "mrope_interleaved: False"),
    "sliding_window": ("tiny-random", _text(use_sliding_window=True), 2, "text_config.use_sliding_window: true"),
    "no_hidden_size": ("tiny-random", _drop_text("hidden_size"), 2, "text_config.hidden_size: None"),
    "string_layers": ("tiny-random", _text(num_hidden_layers="4"), 2, "text_config.num_hidden_layers: '4'"),
    "out_hidden": ("tiny-random", lambda c: c["vision_config"].update(out_hidden_size=64), 2, "vision_config.out_hidden_size: 64"),
    "deepstack_index": ("tiny-random", lambda c: c["vision_config"].update(deepstack_visual_indexes=[1, 9]), 2,
                        "vision_config.deepstack_visual_indexes: [1, 9]"),
    "moe_top_k": ("tiny-moe", _text(num_experts_per_tok=9), 2, "text_config.num_experts_per_tok: 9 is more than num_experts 8"),
    "shared_expert": ("tiny-moe", _text(shared_expert_intermediate_size=64), 2, "shared_expert_intermediate_size: 64"),
    "shape_mismatch": ("tiny-random", _text(intermediate_size=512), 1, "has shape [256, 128], config.json implies [512, 128]"),
    "untied_without_lm_head": ("tiny-random", lambda c: c.update(tie_word_embeddings=False), 1, "no lm_head.weight"),
    # transformers reads a legacy rope_scaling in place of rope_parameters, and "type" as "rope_type"
    "legacy_rope_scaling": ("tiny-random", _text(rope_scaling={"type": "linear", "factor": 2}), 2,
                            "text_config.rope_scaling rope_type: 'linear' is not supported"),
    "rope_type_alias": ("tiny-random", lambda c: c["text_config"]["rope_parameters"].update(type="linear") or
                        c["text_config"]["rope_parameters"].pop("rope_type"), 2, "rope_type: 'linear' is not supported"),
    "top_level_rope_scaling": ("tiny-random", lambda c: c.update(rope_scaling={"type": "linear", "factor": 2}), 2,
                               "config.json rope_scaling (top level): rope_type 'linear' is not supported"),
    "mrope_one_section": ("tiny-random", _rope(mrope_section=[16]), 2, "mrope_section: [16] (three positive integers"),
    "mrope_wrong_sum": ("tiny-random", _rope(mrope_section=[6, 5, 6]), 2, "sums to 17, expected head_dim/2 = 16"),
    "deepstack_empty": ("tiny-random", lambda c: c["vision_config"].update(deepstack_visual_indexes=[]), 2,
                        "vision_config.deepstack_visual_indexes: [] (a non-empty list"),
    "moe_sparse_step_zero": ("tiny-moe", _text(decoder_sparse_step=0), 2, "text_config.decoder_sparse_step: 0 (a positive integer"),
    "attention_bias_string": ("tiny-random", _text(attention_bias="false"), 2,
                              "text_config.attention_bias: 'false' (true or false is required, not a str)"),
    "kv_heads_zero": ("tiny-random", _text(num_key_value_heads=0), 2, "text_config.num_key_value_heads: 0 (a positive integer"),
    "tie_string": ("tiny-random", lambda c: c.update(tie_word_embeddings="true"), 2, "config.tie_word_embeddings: 'true'"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_unsupported_or_inconsistent_config_is_refused(case, tmp_path, capsys):
    preset, edit, code, needle = CONFIG_CASES[case]
    d = _copy(resolve_model_source(preset), tmp_path / "ckpt", edit)
    out = tmp_path / "out"
    assert main(["--model", str(d), "-o", str(out), "-q"]) == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("qwen3vl-compile: error: [load]"), err
    assert needle in err, err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def _break_weights(kind, d):
    f = next(d.glob("*.safetensors"))
    data = f.read_bytes() if not f.is_symlink() else f.resolve().read_bytes()
    f.unlink()
    if kind == "truncated":
        f.write_bytes(data[: len(data) // 2])
    elif kind == "zero_bytes":
        f.write_bytes(b"")
    elif kind == "garbage":
        f.write_bytes(os.urandom(4096))
    elif kind == "missing_tensor":
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(resolve_model_source("tiny-random") / f.name))
        del tensors["model.language_model.layers.2.mlp.down_proj.weight"]
        save_file(tensors, str(f), metadata={"format": "pt"})


@pytest.mark.parametrize("kind,needle", [("truncated", "not a readable safetensors file"),
                                         ("zero_bytes", "not a readable safetensors file"),
                                         ("garbage", "not a readable safetensors file"),
                                         ("missing_tensor", "'layers.2.mlp.down_proj.weight' not found")])
def test_broken_weights_are_refused_at_load(kind, needle, tmp_path, capsys):
    d = _copy(resolve_model_source("tiny-random"), tmp_path / "ckpt")
    _break_weights(kind, d)
    out = tmp_path / "out"
    assert main(["--model", str(d), "-o", str(out), "-q"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "[load]" in err and needle in err, err
    assert not out.exists()


def test_moe_block_size_must_divide_the_expert_size(tmp_path, capsys):
    assert main(["--model", "tiny-moe", "--block-size", "128", "-o", str(tmp_path / "o"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "--block-size 128 does not divide text_config.moe_intermediate_size 64" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("name,content,needle", [
    ("config.json", "[1, 2]", "config.json: not a JSON object"),
    ("config.json", "{not json", "config.json: unreadable"),
    ("preprocessor_config.json", "{not json", "preprocessor_config.json: unreadable"),
    ("preprocessor_config.json", '"a string"', "preprocessor_config.json: not a JSON object"),
    ("generation_config.json", "[]", "generation_config.json: not a JSON object"),
])
def test_broken_json_files_are_refused_in_one_line(name, content, needle, tmp_path, capsys):
    d = _copy(resolve_model_source("tiny-random"), tmp_path / "ckpt")
    (d / name).unlink()
    (d / name).write_text(content)
    out = tmp_path / "out"
    assert main(["--model", str(d), "--graphs", "embedding", "-o", str(out), "-q"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "[load]" in err and needle in err, err
    assert not out.exists()


def _rewrite_weights(d, edit):
    """Replace the checkpoint's (linked) safetensors file by an edited copy of its tensors."""
    from safetensors.torch import load_file, save_file

    f = next(d.glob("*.safetensors"))
    tensors = load_file(str(f.resolve()))
    f.unlink()
    edit(tensors)
    save_file(tensors, str(f), metadata={"format": "pt"})


def _as(key, dtype):
    def edit(t):
        import torch

        t[key] = t[key].to(getattr(torch, dtype))
    return edit


def _transpose(key):
    def edit(t):
        t[key] = t[key].t().contiguous()
    return edit


DOWN = "model.language_model.layers.1.mlp.down_proj.weight"
WEIGHT_CASES = {
    "down_proj_i8": (_as(DOWN, "int8"), 2, f"weight {DOWN} is stored as I8; only float weights"),
    "down_proj_i64": (_as(DOWN, "int64"), 2, f"weight {DOWN} is stored as I64"),
    "down_proj_bool": (_as(DOWN, "bool"), 2, f"weight {DOWN} is stored as BOOL"),
    "down_proj_i16": (_as(DOWN, "int16"), 2, f"weight {DOWN} is stored as I16"),
    "embed_tokens_i16": (_as("model.language_model.embed_tokens.weight", "int16"), 2, "embed_tokens.weight is stored as I16"),
    "vision_fc1_i8": (_as("model.visual.blocks.2.mlp.linear_fc1.weight", "int8"), 2,
                      "model.visual.blocks.2.mlp.linear_fc1.weight is stored as I8"),
    "vision_fc1_transposed": (_transpose("model.visual.blocks.0.mlp.linear_fc1.weight"), 1,
                              "model.visual.blocks.0.mlp.linear_fc1.weight has shape [64, 128], config.json implies [128, 64]"),
    "vision_merger_missing": (lambda t: t.pop("model.visual.deepstack_merger_list.2.norm.weight"), 1,
                              "'deepstack_merger_list.2.norm.weight' not found"),
}


@pytest.mark.parametrize("case", list(WEIGHT_CASES))
def test_weights_of_the_wrong_dtype_or_shape_are_refused_at_load(case, tmp_path, capsys):
    """From the safetensors headers, text and vision alike: integer or bool tensors, shapes the
    config does not imply."""
    edit, code, needle = WEIGHT_CASES[case]
    d = _copy(resolve_model_source("tiny-random"), tmp_path / "ckpt")
    _rewrite_weights(d, edit)
    out = tmp_path / "out"
    assert main(["--model", str(d), "-o", str(out), "-q"]) == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "[load]" in err and needle in err, err
    assert not out.exists()


def _write(name, text):
    def edit(d):
        (d / name).unlink(missing_ok=True)
        (d / name).write_text(text)
    return edit


def _no_chat_template(d):
    (d / "chat_template.jinja").unlink()
    config = json.loads((d / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    _write("tokenizer_config.json", json.dumps(config))(d)
    (d / "chat_template.json").unlink(missing_ok=True)


CHAT_CASES = {
    "template_syntax_error": (_write("chat_template.jinja", "{% for m in messages %}{{ m.content }"), 1,
                              "the chat template has a syntax error at line 1"),
    "template_raises": (_write("chat_template.jinja", "{{ raise_exception('no images here') }}"), 1,
                        "chat template does not render a user turn with an image (BundleError"),
    "no_chat_template": (_no_chat_template, 1, "no chat template"),
    "eos_string": (_write("generation_config.json", '{"eos_token_id": "<|im_end|>"}'), 2,
                   "generation_config.json eos_token_id: '<|im_end|>' (a token id"),
    "eos_numeric_string": (_write("generation_config.json", '{"eos_token_id": ["2"]}'), 2, "eos_token_id: ['2']"),
    "eos_outside_vocab": (_write("generation_config.json", '{"eos_token_id": 99999999}'), 2, "eos_token_id: 99999999"),
    "pad_float": (_write("generation_config.json", '{"eos_token_id": 1, "pad_token_id": 1.5}'), 2, "pad_token_id: 1.5"),
}


@pytest.mark.parametrize("case", list(CHAT_CASES))
def test_a_bundle_that_could_not_chat_is_refused_at_load(case, tmp_path, capsys):
    """The chat template is rendered once with the runtime's own code and the generation ids
    checked, so qwen3vl-run never meets a template or stop id it cannot use."""
    edit, code, needle = CHAT_CASES[case]
    d = _copy(resolve_model_source("tiny-random"), tmp_path / "ckpt")
    edit(d)
    out = tmp_path / "out"
    assert main(["--model", str(d), "--graphs", "embedding", "-o", str(out), "-q"]) == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "[load]" in err and needle in err, err
    assert not out.exists()


def test_the_default_context_length_adapts_to_the_model(tmp_path, capsys, monkeypatch):
    """The default 8192 becomes a 4096-position model's 4096 (and says so); an explicit 8192 is refused."""
    from qwen3vl_compile import compiler

    d = _copy(resolve_model_source("tiny-random"), tmp_path / "ckpt", _text(max_position_embeddings=4096))
    seen = {}

    def fake_build(ck, cfg, *args):
        seen["context"] = cfg.decoder.context_length
        return {"graphs": {}, "parity": {}}

    monkeypatch.setattr(compiler, "_build", fake_build)
    assert main(["--model", str(d), "--graphs", "embedding,decoder", "-o", str(tmp_path / "o"), "-v"]) == 0
    assert seen["context"] == 4096
    assert "context length 4096: the model's max_position_embeddings (the default 8192 is above it" in capsys.readouterr().err
    assert main(["--model", str(d), "--graphs", "embedding,decoder", "--context-length", "8192", "-o", str(tmp_path / "o"), "-q"]) == 2
    assert "--context-length 8192: above the model's max_position_embeddings 4096" in capsys.readouterr().err


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), RuntimeError("Error while serializing: IoError")])
def test_a_full_cache_disk_is_one_line(error, tmp_path, capsys, monkeypatch):
    """A preset cannot be written to --cache-dir (a full disk: OSError ENOSPC, or the error
    safetensors wraps it in): one line naming the directory, exit 1."""
    from qwen3vl_compile.model import checkpoint

    def full(*args, **kwargs):
        raise error

    monkeypatch.setattr(checkpoint, "materialize_preset", full)
    assert main(["--model", "tiny-random", "--cache-dir", str(tmp_path / "c"), "-o", str(tmp_path / "o"), "-q"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"[load] cannot write the 'tiny-random' preset to {tmp_path / 'c'}" in err, err
    assert ("No space left on device" if isinstance(error, OSError) else "RuntimeError: Error while serializing") in err
