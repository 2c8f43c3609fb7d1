"""Checkpoints as they are downloaded: bf16 weights in several safetensors shards with an
index, an untied lm_head, several eos ids; the decoder gate on a truncated slice; planted
decoder bugs fail the default (INT4) compile."""

from __future__ import annotations

import json

import pytest
import torch

from qwen3vl_compile import Pipeline
from qwen3vl_compile.bundle_cli import main as bundle_main
from qwen3vl_compile.cli import main as compile_main
from qwen3vl_compile.presets import preset_config
from qwen3vl_compile.presets.materialize import GENERATION_CONFIG, build_random_model, write_checkpoint

from qwen3vl_compile.model.hf_reference import make_hf_generate
from planted import swap_mrope_streams

NEW_TOKENS = 24


@pytest.fixture(scope="module")
def untied_bf16(tmp_path_factory):
    """The tiny shape, untied, 6 text layers (so a 4-layer gate slice is a real truncation),
    saved in bf16 in ~8 shards, with two eos ids."""
    values = preset_config("tiny-random")
    values["tie_word_embeddings"] = values["text_config"]["tie_word_embeddings"] = False
    values["text_config"]["num_hidden_layers"] = 6
    model = build_random_model(values, seed=11)
    out = tmp_path_factory.mktemp("ckpt") / "Qwen3-VL-Tiny-Untied"
    write_checkpoint(out, model, dtype=torch.bfloat16, max_shard_size="6MB",
                     generation={**GENERATION_CONFIG, "eos_token_id": [151645, 151643]})
    return out


def test_checkpoint_looks_downloaded(untied_bf16):
    index = json.loads((untied_bf16 / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and all((untied_bf16 / s).is_file() for s in shards)
    assert "lm_head.weight" in index["weight_map"]
    from safetensors import safe_open

    with safe_open(str(untied_bf16 / shards[0]), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}


@pytest.fixture(scope="module")
def truncated_gate_bundle(untied_bf16, tmp_path_factory):
    """fp32 bundle whose decoder gate runs on a slice: the full-depth budget is set to 0."""
    from qwen3vl_compile.export import decoder_gate

    out = tmp_path_factory.mktemp("b") / "bundle"
    mp = pytest.MonkeyPatch()
    mp.setattr(decoder_gate, "FULL_DEPTH_BUDGET", 0)
    try:
        rc = compile_main(["--model", str(untied_bf16), "--buckets", "448", "--precision", "fp32", "-o", str(out), "-q"])
    finally:
        mp.undo()
    assert rc == 0
    return out


@pytest.mark.slow  # a full compile of the untied checkpoint
def test_gate_on_a_truncated_slice_is_recorded(truncated_gate_bundle, capsys):
    m = json.loads((truncated_gate_bundle / "manifest.json").read_text())
    d = m["parity"]["decoder"]
    assert (d["layers_checked"], d["layers"], d["reference_dtype"]) == (4, 6, "float32")  # DeepStack levels + 1
    assert d["passed"] and set(d["cases"]) == {"text_only", "image", "two_images"}
    assert "own logits" in d["golden_source"] and d["golden"]["file"] == "golden/decoder.npz"
    assert max(o["max_rel"] for c in d["cases"].values() for o in c.values()) < 1e-5
    assert not list(truncated_gate_bundle.rglob(".gate*"))  # the slice is not shipped
    assert bundle_main(["verify", str(truncated_gate_bundle)]) == 0
    capsys.readouterr()


@pytest.fixture(scope="module")
def images(noise_images):
    return noise_images((448, 448), (500, 300))


@pytest.mark.slow  # the compiled bundle and Hugging Face generate
@pytest.mark.parametrize("case", ["one_image", "two_images", "text_only"])
def test_greedy_tokens_equal_hf_generate(truncated_gate_bundle, untied_bf16, images, case):
    paths = {"one_image": images[:1], "two_images": images, "text_only": []}[case]
    prompt = "Describe the picture in detail." if paths else "Write a poem about the sea."
    ref = make_hf_generate(untied_bf16)(paths, prompt, NEW_TOKENS)
    assert len(ref) >= NEW_TOKENS, "reference stopped early: pick another prompt"
    got = Pipeline.load(truncated_gate_bundle, threads=2).generate(images=paths, prompt=prompt, max_new_tokens=NEW_TOKENS)
    assert got.token_ids == ref


def _drop_deepstack(monkeypatch):
    import qwen3vl_compile.passes as passes
    from qwen3vl_compile.passes.insert_deepstack import InsertDeepStackPass

    real = passes.decoder_passes
    monkeypatch.setattr(passes, "decoder_passes", lambda spec: tuple(p for p in real(spec) if not isinstance(p, InsertDeepStackPass)))


def _swap_mrope(monkeypatch):
    from qwen3vl_compile.export import decoder as decoder_module

    real = decoder_module.build_decoder_model
    monkeypatch.setattr(decoder_module, "build_decoder_model",
                        lambda *a, **k: (lambda m, spec: (swap_mrope_streams(m), spec))(*real(*a, **k)))


@pytest.mark.slow  # four compiles; the planted bugs are also checked at the verify level in test_decoder.py
@pytest.mark.parametrize("plant", [_drop_deepstack, _swap_mrope], ids=["deepstack_dropped", "mrope_swapped"])
@pytest.mark.parametrize("budget", ["full_depth", "slice"])
def test_planted_decoder_bug_fails_the_default_compile(untied_bf16, tmp_path, monkeypatch, capsys, plant, budget):
    from qwen3vl_compile.export import decoder_gate

    if budget == "slice":
        monkeypatch.setattr(decoder_gate, "FULL_DEPTH_BUDGET", 0)
    plant(monkeypatch)
    out = tmp_path / "bundle"
    rc = compile_main(["--model", str(untied_bf16), "--graphs", "decoder", "-o", str(out), "-q"])  # default: int4
    err = capsys.readouterr().err
    assert rc == 1, err
    assert "[verify] parity check failed" in err and "decoder [image] logits" in err
    assert not out.exists() and list(tmp_path.iterdir()) == []
