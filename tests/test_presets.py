"""The official-shape presets: the transformers config classes take them without dropping or
changing a value, and the published sizes hold (text parameters, experts, DeepStack)."""

from __future__ import annotations

import pytest
import transformers

from qwen3vl_compile.presets import OFFICIAL, preset_config
from qwen3vl_compile.presets.configs import split_preset

# Published text sizes (billions of parameters, layers + embeddings + lm_head) and MoE shape.
EXPECTED = {
    "qwen3-vl-2b": (1.7, None), "qwen3-vl-4b": (4.0, None), "qwen3-vl-8b": (7.6, None), "qwen3-vl-32b": (32.0, None),
    "qwen3-vl-30b-a3b": (30.2, (128, 8, 768)), "qwen3-vl-235b-a22b": (234.5, (128, 8, 1536)),
}


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_config_classes_keep_every_value(name):
    values = preset_config(name)
    arch = values["architectures"][0]
    cfg = getattr(transformers, arch.replace("ForConditionalGeneration", "Config"))(**values)
    for section in ("text_config", "vision_config"):
        obj = getattr(cfg, section)
        for key, want in values[section].items():
            if key in ("model_type", "rope_parameters"):
                continue
            assert getattr(obj, key) == want, (section, key)
    assert cfg.text_config.rope_parameters["mrope_section"] == [24, 20, 20]
    assert cfg.vision_config.out_hidden_size == cfg.text_config.hidden_size


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_published_sizes(name):
    from qwen3vl_compile.model.checkpoint import Checkpoint
    from qwen3vl_compile.export.decoder_gate import text_weight_bytes

    billions, moe = EXPECTED[name]
    ck = Checkpoint(path=None, config=preset_config(name), preprocessor={})
    assert text_weight_bytes(ck) / 4e9 == pytest.approx(billions, rel=0.02)
    t = ck.text_config
    if moe:
        assert ck.is_moe and (t["num_experts"], t["num_experts_per_tok"], t["moe_intermediate_size"]) == moe
    else:
        assert not ck.is_moe
    assert ck.tie_word_embeddings == (name in ("qwen3-vl-2b", "qwen3-vl-4b"))


def test_layer_suffix():
    assert split_preset("qwen3-vl-8b:4") == ("qwen3-vl-8b", 4)
    assert preset_config("qwen3-vl-8b:4")["text_config"]["num_hidden_layers"] == 4
    for bad in ("qwen3-vl-8b:0", "qwen3-vl-8b:37", "qwen3-vl-8b:x", "tiny:2", "nope:4"):
        assert split_preset(bad) is None, bad
