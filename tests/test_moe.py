"""Qwen3-VL MoE (``Qwen3VLMoeForConditionalGeneration``) end to end on the tiny MoE preset
(8 experts, top-2, every layer sparse, three DeepStack levels, std-0.2 weights)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from qwen3vl_compile import Pipeline
from qwen3vl_compile.model.checkpoint import Checkpoint, resolve_model_source
from qwen3vl_compile.cli import main as compile_main

from qwen3vl_compile.model.hf_reference import make_hf_generate

NEW_TOKENS = 24


@pytest.fixture(scope="module")
def moe_path():
    return resolve_model_source("tiny-moe")


@pytest.fixture(scope="module")
def hf_moe(moe_path):
    return Checkpoint.open(moe_path).load_full_model()


def test_vision_tower_is_the_dense_class_on_moe_weights(moe_path, hf_moe):
    """The compiler builds every vision tower as Qwen3VLVisionModel (the class the patches
    target): on MoE weights it equals Qwen3VLMoeVisionModel."""
    visual = Checkpoint.open(moe_path).load_vision_tower()
    assert type(hf_moe.model.visual).__name__ == "Qwen3VLMoeVisionModel"
    grid = torch.tensor([[1, 8, 12], [1, 6, 6]])
    pixels = torch.randn(int(grid.prod(-1).sum()), 1536, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, ref = visual(pixels, grid_thw=grid), hf_moe.model.visual(pixels, grid_thw=grid)
    assert torch.equal(ours.pooler_output, ref.pooler_output)
    assert all(torch.equal(a, b) for a, b in zip(ours.deepstack_features, ref.deepstack_features))


@pytest.fixture(scope="module")
def fp32_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("moe") / "bundle"
    assert compile_main(["--model", "tiny-moe", "--buckets", "448", "--precision", "fp32", "-o", str(out), "-q"]) == 0
    return out


@pytest.fixture(scope="module")
def images(noise_images):
    return noise_images((448, 448), (320, 480))


@pytest.mark.slow  # the fp32 MoE bundle (a full compile) and Hugging Face generate
@pytest.mark.parametrize("case", ["one_image", "two_images", "text_only"])
def test_greedy_tokens_equal_hf_generate(fp32_bundle, moe_path, hf_moe, images, case):
    paths = {"one_image": images[:1], "two_images": images, "text_only": []}[case]
    prompt = "What is in this picture?" if paths else "Tell me about the mountains."
    ref = make_hf_generate(moe_path, hf_moe)(paths, prompt, NEW_TOKENS)
    assert len(ref) >= NEW_TOKENS, "reference stopped early: pick another prompt"
    got = Pipeline.load(fp32_bundle, threads=2).generate(images=paths, prompt=prompt, max_new_tokens=NEW_TOKENS)
    assert got.token_ids == ref


@pytest.mark.slow  # the fp32 MoE bundle (a full compile)
def test_fp32_bundle_records_the_moe_graph(fp32_bundle):
    m = json.loads((fp32_bundle / "manifest.json").read_text())
    assert m["source"]["architecture"] == "Qwen3VLMoeForConditionalGeneration"
    d = m["parity"]["decoder"]
    assert d["passed"] and d["layers_checked"] == d["layers"] == 4
    import onnx

    ops = [n.op_type for n in onnx.load(str(fp32_bundle / "decoder.onnx"), load_external_data=False).graph.node]
    assert ops.count("MoE") == 4 and "QMoE" not in ops


@pytest.mark.slow  # an int4 decoder compile and its gate
def test_int4_moe_is_gated(tmp_path):
    """Default precision: QMoE experts, gated exactly at fp32 activations and within the
    measured MoE tolerance at accuracy level 4."""
    out = tmp_path / "bundle"
    assert compile_main(["--model", "tiny-moe", "--graphs", "decoder", "-o", str(out), "-q"]) == 0
    d = json.loads((out / "manifest.json").read_text())["parity"]["decoder"]
    assert d["passed"] and d["accuracy_level"] == 4
    for case in d["cases"].values():
        assert case["logits"]["max_rel"] < 1e-5
        assert case["logits_at_accuracy_level_4"]["tolerance_max_rel"] == 0.45
    import onnx

    ops = [n.op_type for n in onnx.load(str(out / "decoder.onnx"), load_external_data=False).graph.node]
    assert ops.count("QMoE") == 4


@pytest.mark.slow  # an int4 decoder compile and its gate
def test_moe_decoder_without_deepstack_fails_the_compile(tmp_path, monkeypatch, capsys):
    import qwen3vl_compile.passes as passes
    from qwen3vl_compile.passes.insert_deepstack import InsertDeepStackPass

    real = passes.decoder_passes
    monkeypatch.setattr(passes, "decoder_passes", lambda spec: tuple(p for p in real(spec) if not isinstance(p, InsertDeepStackPass)))
    out = tmp_path / "bundle"
    assert compile_main(["--model", "tiny-moe", "--graphs", "decoder", "-o", str(out), "-q"]) == 1
    assert "decoder [image] logits" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("model,precision", [
    ("tiny-random", "fp32"),
    pytest.param("tiny-moe", "int4", marks=pytest.mark.slow),  # rounds every expert: seconds
    pytest.param("tiny-moe", "fp16", marks=pytest.mark.slow),
])
def test_layer_streaming_reference_equals_the_whole_model(model, precision):
    """For slices whose fp32 weights exceed memory (235B-A22B) the reference runs one layer
    at a time; it gives exactly the whole-model reference's logits, plain and rounded."""
    from qwen3vl_compile.export import decoder_gate as dv

    ck = Checkpoint.open(resolve_model_source(model))
    options = dv.DecoderOptions(precision)
    cases = dv._cases(ck, dv._reference_skeleton(ck, 4), seed=5)
    whole = dv.load_text_reference(ck, 4)
    plain = dv.run_reference(whole, cases)
    n = dv.round_like_decoder(whole, options)
    oracle = dv.run_reference(whole, cases) if n else plain
    s_plain, s_oracle, s_n = dv.run_reference_streaming(ck, 4, options, cases)
    assert s_n == n
    for name in cases:
        np.testing.assert_array_equal(s_plain[name], plain[name])
        np.testing.assert_array_equal(s_oracle[name], oracle[name])


@pytest.mark.slow  # two decoder compiles and their gates
def test_hub_layout_experts_compile_and_pass_the_gate(tmp_path):
    """The Hub's Qwen3-VL MoE files store experts as [E, H, 2I] / [E, I, H] (transposed against
    transformers 5's in-memory layout): a checkpoint in either layout compiles to the same
    decoder and passes the gate. Expert size 32, so that 2I != H and the layouts differ."""
    import numpy as np
    from safetensors.torch import load_file, save_file

    from qwen3vl_compile.presets import preset_config
    from qwen3vl_compile.presets.materialize import build_random_model, write_checkpoint

    values = preset_config("tiny-moe")
    values["text_config"]["moe_intermediate_size"] = 32
    memory = write_checkpoint(tmp_path / "memory", build_random_model(values, seed=3))
    hub = write_checkpoint(tmp_path / "hub", build_random_model(values, seed=3))
    for f in hub.glob("*.safetensors"):
        tensors = {k: v.transpose(1, 2).contiguous() if k.endswith(("experts.gate_up_proj", "experts.down_proj")) else v
                   for k, v in load_file(str(f)).items()}
        save_file(tensors, str(f), metadata={"format": "pt"})
    gu = next(v for k, v in tensors.items() if k.endswith("experts.gate_up_proj"))
    assert tuple(gu.shape) == (8, 128, 64)  # [E, H, 2I]
    logits = {}
    for name, d in (("memory", memory), ("hub", hub)):
        out = tmp_path / f"bundle-{name}"
        assert compile_main(["--model", str(d), "--graphs", "decoder", "--precision", "fp32", "-o", str(out), "-q"]) == 0
        parity = json.loads((out / "manifest.json").read_text())["parity"]["decoder"]
        assert parity["passed"] and max(c["logits"]["max_rel"] for c in parity["cases"].values()) < 1e-5
        logits[name] = np.load(out / "golden" / "decoder.npz")["reference_logits"]
    np.testing.assert_array_equal(logits["memory"], logits["hub"])
