"""``--target ort-genai``: the wide-channel DeepStack passes on their own (matching and
non-matching graphs, ONNX Runtime before and after), the bundle's onnxruntime-genai files,
and greedy tokens from the unmodified onnxruntime-genai runtime equal to ours and to
Hugging Face ``generate`` at fp32."""

import hashlib
import json

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from PIL import Image

from qwen3vl_compile import Pipeline
from qwen3vl_compile.bundle_cli import verify_bundle as verify
from qwen3vl_compile.cli import main as compile_main
from qwen3vl_compile.errors import PassError, UsageError
from qwen3vl_compile.packing import pack, unpack
from qwen3vl_compile.passes.base import run_passes
from qwen3vl_compile.passes.pack_deepstack import PackDeepStackOutputsPass
from qwen3vl_compile.passes.unpack_deepstack import UnpackDeepStackInputsPass
from qwen3vl_compile.runtime.chat import build_messages
from qwen3vl_compile.runtime.decoder_session import DecoderSession
from qwen3vl_compile.runtime.genai import genai_greedy

NEW_TOKENS = 24
K, M, H = 3, 5, 4

# A vision-like graph: features [M, H] and DeepStack levels [K, M, H] from one input.
PRODUCER = f"""
<ir_version: 10, opset_import: ["" : 18]>
producer (float[{M}, {H}] x) => (float[{M}, {H}] features, float[{K}, {M}, {H}] deepstack) {{
    features = Relu(x)
    two = Constant <value = float[{K}, 1, 1] {{1.0, 2.0, 3.0}}> ()
    deepstack = Mul(two, x)
}}
"""
# A decoder-like graph: reads features [B, S, H] and DeepStack [K, B, S, H].
CONSUMER = f"""
<ir_version: 10, opset_import: ["" : 18]>
consumer (float[1, {M}, {H}] features, float[{K}, 1, {M}, {H}] deepstack) => (float[1, {M}, {H}] y) {{
    axes = Constant <value = int64[1] {{0}}> ()
    levels = ReduceSum <keepdims = 0> (deepstack, axes)
    weighted = Mul(levels, features)
    y = Add(weighted, features)
}}
"""


def _model(text: str) -> ir.Model:
    return ir.from_proto(onnx.parser.parse_model(text))


def _run(model: ir.Model, feeds: dict) -> dict:
    s = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in s.get_outputs()], s.run(None, feeds)))


def test_packing_round_trip():
    rng = np.random.default_rng(0)
    feats, deep = rng.standard_normal((2, 3, H)).astype(np.float32), rng.standard_normal((K, 2, 3, H)).astype(np.float32)
    wide = pack(feats, deep)
    assert wide.shape == (2, 3, H * (1 + K))
    np.testing.assert_array_equal(wide[..., :H], feats)
    np.testing.assert_array_equal(wide[..., H * 2:H * 3], deep[1])  # level k in channels [H(1+k), H(2+k))
    back = unpack(wide, K)
    np.testing.assert_array_equal(back[0], feats)
    np.testing.assert_array_equal(back[1], deep)
    with pytest.raises(ValueError, match="does not line up"):
        pack(feats, deep[:, :1])


def test_pack_outputs_pass_matches_numpy_and_runs_once():
    x = np.random.default_rng(1).standard_normal((M, H)).astype(np.float32)
    model = _model(PRODUCER)
    before = _run(model, {"x": x})
    model, reports = run_passes(model, [PackDeepStackOutputsPass("features", "deepstack", "features")])
    assert reports[0].modified and reports[0].stats["packed_channels"] == H * (1 + K)
    assert [v.name for v in model.graph.outputs] == ["features"]
    after = _run(model, {"x": x})
    np.testing.assert_array_equal(after["features"], pack(before["features"], before["deepstack"]))
    # Already packed: nothing to do.
    model, reports = run_passes(model, [PackDeepStackOutputsPass("features", "deepstack", "features")])
    assert not reports[0].modified


def test_pack_outputs_pass_refuses_what_does_not_match():
    with pytest.raises(PassError, match="no output 'deepstack_features'"):
        run_passes(_model(PRODUCER), [PackDeepStackOutputsPass("features", "deepstack_features", "wide")])
    misaligned = PRODUCER.replace(f"float[{K}, {M}, {H}] deepstack)", f"float[{K}, {M}, {H + 1}] deepstack)")
    with pytest.raises(PassError, match="does not line up"):
        run_passes(_model(misaligned), [PackDeepStackOutputsPass("features", "deepstack", "wide")])


def test_unpack_inputs_pass_keeps_outputs():
    rng = np.random.default_rng(2)
    feats, deep = rng.standard_normal((1, M, H)).astype(np.float32), rng.standard_normal((K, 1, M, H)).astype(np.float32)
    model = _model(CONSUMER)
    before = _run(model, {"features": feats, "deepstack": deep})["y"]
    model, reports = run_passes(model, [UnpackDeepStackInputsPass("features", "deepstack", "wide")])
    assert reports[0].modified and reports[0].stats["uses_rewired"] == 3
    assert [v.name for v in model.graph.inputs] == ["wide"]
    assert list(model.graph.inputs[0].shape) == [1, M, H * (1 + K)]
    after = _run(model, {"wide": pack(feats, deep)})["y"]
    np.testing.assert_array_equal(after, before)
    model, reports = run_passes(model, [UnpackDeepStackInputsPass("features", "deepstack", "wide")])
    assert not reports[0].modified


def test_unpack_inputs_pass_refuses_what_does_not_match():
    with pytest.raises(PassError, match="no input 'deepstack_embeds'"):
        run_passes(_model(CONSUMER), [UnpackDeepStackInputsPass("features", "deepstack_embeds", "wide")])
    no_levels = CONSUMER.replace(f"float[{K}, 1, {M}, {H}] deepstack", f"float[1, {M}, {H}] deepstack")
    with pytest.raises(PassError, match="does not line up"):
        run_passes(_model(no_levels), [UnpackDeepStackInputsPass("features", "deepstack", "wide")])


# -- the compiled bundle --------------------------------------------------------------------


@pytest.fixture(scope="module")
def manifest(genai_bundle):
    return json.loads((genai_bundle / "manifest.json").read_text())


@pytest.mark.slow  # the --target ort-genai compile (session fixture genai_bundle)
def test_bundle_files_and_configs(genai_bundle, manifest):
    cfg = json.loads((genai_bundle / "genai_config.json").read_text())["model"]
    spec = manifest["graphs"]["decoder"]["spec"]
    assert cfg["type"] == "qwen3_vl"
    assert cfg["decoder"]["hidden_size"] == spec["hidden"] * (1 + spec["deepstack_levels"]) == 128 * 4
    assert {cfg[k]["filename"] for k in ("decoder", "embedding", "vision")} == {
        "genai_decoder.onnx", "genai_embedding.onnx", "genai_vision.onnx"}
    # The checkpoint's Qwen3-VL processor values, not the Qwen2.5-VL bounds (3136 / 12845056).
    resize = next(t["operation"] for t in json.loads((genai_bundle / "processor_config.json").read_text())["processor"]["transforms"]
                  if t["operation"]["type"] == "Resize")["attrs"]
    assert (resize["min_pixels"], resize["max_pixels"], resize["patch_size"]) == (65536, 16777216, 16)
    # The wrappers share their sources' external weights instead of copying them.
    decoder = onnx.load(str(genai_bundle / "genai_decoder.onnx"), load_external_data=False)
    locations = {e.value for t in decoder.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"decoder.onnx.data"}
    assert manifest["graphs"]["genai_decoder"]["data_files"] == ["decoder.onnx.data"]
    assert (genai_bundle / "genai_decoder.onnx").stat().st_size < 1 << 20
    for name in ("genai_vision", "genai_embedding", "genai_decoder"):
        assert manifest["files"][f"{name}.onnx"]["sha256"] == hashlib.sha256((genai_bundle / f"{name}.onnx").read_bytes()).hexdigest()
        assert manifest["parity"][name]["passed"], manifest["parity"][name]
    assert [p["pass"] for p in manifest["graphs"]["genai_embedding"]["passes"]] == [
        "UnpackDeepStackInputsPass", "PackDeepStackOutputsPass", "CheckModelPass"]


@pytest.mark.slow  # the --target ort-genai compile (session fixture genai_bundle)
def test_verify_reruns_the_genai_graphs(genai_bundle, capsys):
    assert verify(genai_bundle) == 0
    out = capsys.readouterr().out
    for name in ("genai_vision", "genai_embedding", "genai_decoder"):
        assert name in out


@pytest.mark.slow  # the --target ort-genai compile (session fixture genai_bundle)
def test_genai_decoder_reads_the_deepstack_channels(genai_bundle, manifest):
    """The same golden prompt through decoder.onnx and genai_decoder.onnx: equal logits with
    DeepStack in the channels; zeroing those channels changes them (the check can see it)."""
    golden = dict(np.load(genai_bundle / manifest["parity"]["decoder"]["golden"]["file"]))
    deep = golden["prefill_deepstack"]
    assert np.abs(deep).max() > 0, "the golden prompt must carry an image"
    plain = DecoderSession(genai_bundle / "decoder.onnx", max_length=256)
    wide = DecoderSession(genai_bundle / "genai_decoder.onnx", max_length=256, packed_levels=3)
    assert wide.packed and wide.hidden == plain.hidden == 128
    ref = plain.prefill(golden["prefill_embeds"], golden["prefill_positions"], deep)
    np.testing.assert_allclose(wide.prefill(golden["prefill_embeds"], golden["prefill_positions"], deep), ref, rtol=0, atol=1e-5)
    dropped = wide.prefill(golden["prefill_embeds"], golden["prefill_positions"], np.zeros_like(deep))
    assert np.abs(dropped - ref).max() / np.abs(ref).max() > 1e-2


def test_target_needs_every_graph(tmp_path, capsys):
    assert compile_main(["--model", "tiny-random", "--buckets", "dynamic", "--target", "ort-genai", "--graphs", "vision",
                         "-o", str(tmp_path / "o")]) == 2
    assert "needs every graph" in capsys.readouterr().err
    from qwen3vl_compile.buckets import parse_buckets
    from qwen3vl_compile.config import CompileConfig

    with pytest.raises(UsageError, match="any-size vision graph"):
        CompileConfig(model="tiny-random", output=tmp_path / "o", buckets=parse_buckets("448"), target="ort-genai")
    assert not (tmp_path / "o").exists()


# -- onnxruntime-genai runs the bundle -------------------------------------------------------


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("genai_imgs")
    out = {}
    for name, (w, h), seed in [("sq448", (448, 448), 4), ("odd", (500, 300), 5)]:
        arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
        arr = (arr.astype(np.float32) * 0.5 + np.linspace(0, 127, w)[None, :, None]).astype(np.uint8)
        out[name] = d / f"{name}.png"
        Image.fromarray(arr).save(out[name])
    return out


GENAI_CASES = {
    "one_image": (["sq448"], "Describe this image."),
    "two_images": (["sq448", "odd"], "Compare the two images."),
}


@pytest.mark.slow  # the ort-genai compile, Hugging Face generate and onnxruntime-genai runs
@pytest.mark.parametrize("case", list(GENAI_CASES))
def test_onnxruntime_genai_tokens_equal_ours_and_hf(genai_bundle, hf_generate, images, case):
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed (extra 'genai')")
    names, prompt = GENAI_CASES[case]
    paths = [images[n] for n in names]
    pipe = Pipeline.load(genai_bundle, threads=2)
    ours = pipe.generate(images=paths, prompt=prompt, max_new_tokens=NEW_TOKENS).token_ids
    text = pipe.chat.render(build_messages(prompt, len(paths)))  # one <|image_pad|> per image: genai expands it
    theirs = genai_greedy(og.Model(str(genai_bundle)), text, paths, NEW_TOKENS, pipe.chat.stop_ids)
    ref = hf_generate(paths, prompt, NEW_TOKENS)
    assert len(ref) >= NEW_TOKENS, "reference stopped early: pick another prompt"
    assert theirs == ours == ref
