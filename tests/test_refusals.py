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
