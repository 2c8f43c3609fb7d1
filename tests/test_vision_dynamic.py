"""The any-size vision graphs: ``vision_dynamic`` (``--buckets ...,dynamic``, one image per
call, unmasked attention) and ``vision_dynamic_multi`` (``--target ort-genai``, several images
per call): parity against the unpatched tower on grids the export never saw and on several
images, a planted bug that the verifier must catch, bucket parsing, serving through a
compiled bundle, and memory that does not grow with patches^2."""

import copy
import hashlib
import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from transformers import vision_utils

from qwen3vl_compile import Pipeline
from qwen3vl_compile.buckets import DynamicVision, VisionBucket, parse_buckets, split_buckets
from qwen3vl_compile.bundle.goldens import check_golden
from qwen3vl_compile.cli import main as compile_main
from qwen3vl_compile.errors import RuntimeInputError, UsageError
from qwen3vl_compile.export import vision_dynamic as vd
from qwen3vl_compile.bundle.goldens import pixel_values_from_u8
from qwen3vl_compile.patches import vision_dynamic_export_patches
from qwen3vl_compile.patches import vision_forward_dynamic as forward_patch

ALL_OUTPUTS = {"image_features", "deepstack_0", "deepstack_1", "deepstack_2"}
# Tests on the compiled bundle (the --target ort-genai compile, about a minute on 2 cores) and
# the planted-bug export: the slow tier.
slow = pytest.mark.slow


@pytest.fixture(scope="module")
def bundle(genai_bundle):
    # --buckets 448 --target ort-genai: the any-size graph plus onnxruntime-genai's packed
    # wrappers, which the runtime must not mistake for its own dynamic graph.
    return genai_bundle


@pytest.fixture(scope="module")
def manifest(bundle):
    return json.loads((bundle / "manifest.json").read_text())


@pytest.fixture(scope="module")
def session(bundle):
    """The multi-image graph."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(str(bundle / "vision_dynamic_multi.onnx"), opts, providers=["CPUExecutionProvider"])


def _run(session, grids, seed=3):
    x = pixel_values_from_u8(vd.random_pixel_u8(grids, 1536, seed))
    return x, session.run(vd.OUTPUT_NAMES, {"pixel_values": x, "image_grid_thw": np.array(grids, np.int64)})


# -- grid tensors computed in the graph equal Hugging Face's own helpers ------------------


@pytest.mark.parametrize(
    "grids",
    [[(1, 8, 12)], [(1, 30, 30)], [(1, 8, 12), (1, 20, 14), (1, 6, 6)], [(2, 8, 8)], [(3, 4, 6), (1, 16, 36)]],
)
def test_grid_tensors_equal_transformers_vision_utils(tiny_visual, grids):
    g = torch.tensor(grids)
    n = int(g.prod(-1).sum())
    got = forward_patch.grid_kwargs(tiny_visual, n, g)
    idx, w = vision_utils.get_vision_interpolation_indices_and_weights(
        g, tiny_visual.num_grid_per_side, mode="bilinear", align_corners=True, spatial_merge_size=2
    )
    assert torch.equal(got["interp_indices"], idx) and torch.equal(got["interp_weights"], w)
    assert torch.equal(got["position_ids"], vision_utils.get_vision_position_ids(g, 2))
    # The mask is block-diagonal over HF's attention segments (one per image and frame).
    cu = vision_utils.get_vision_cu_seqlens(g).long()
    segment = torch.bucketize(torch.arange(n), cu[1:], right=True)
    assert torch.equal(got["cu_seqlens"][0, 0] == 0, segment[:, None] == segment[None, :])


def test_patched_eager_equals_unpatched_and_restores(tiny_visual):
    from transformers.models.qwen3_vl import modeling_qwen3_vl as upstream

    before = (upstream.Qwen3VLVisionModel.__dict__["forward"], upstream.Qwen3VLVisionAttention.__dict__["forward"])
    grids = [(1, 8, 12), (2, 4, 6)]
    x = torch.from_numpy(pixel_values_from_u8(vd.random_pixel_u8(grids, 1536, 0)))
    with torch.no_grad():
        ref = tiny_visual(x, grid_thw=torch.tensor(grids)).pooler_output
        with vision_dynamic_export_patches() as names:
            got = tiny_visual(x, grid_thw=torch.tensor(grids)).pooler_output
    assert names == ["Qwen3VLVisionModel.forward", "Qwen3VLVisionAttention.forward"]
    assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-6
    after = (upstream.Qwen3VLVisionModel.__dict__["forward"], upstream.Qwen3VLVisionAttention.__dict__["forward"])
    assert all(a is b for a, b in zip(after, before))


# -- parity of the exported graph --------------------------------------------------------


@slow
@pytest.mark.parametrize("name", ["vision_dynamic", "vision_dynamic_multi"])
def test_parity_on_unseen_grids_and_multi_image(bundle, manifest, tiny_visual, name):
    assert not set(vd.PARITY_GRIDS) & set(vd.EXPORT_GRIDS)
    assert any(h != w for _, h, w in vd.PARITY_GRIDS) and len(set(vd.MULTI_IMAGE)) > 1
    parity = vd.verify_vision_dynamic(bundle / f"{name}.onnx", tiny_visual, threads=2)
    assert parity.graph == name
    assert set(parity.cases) == {
        "grid 8x12", "grid 20x14", "grid 16x36", "grid 30x30", "grid 6x6", "3 images 8x12+20x14+6x6"
    }
    for outs in parity.cases.values():
        assert {o.name for o in outs} == ALL_OUTPUTS
    assert parity.passed, parity.failures()
    assert parity.worst_rel < 1e-5  # measured ~1.9e-6; the gate is 1e-4
    # The compile recorded the same verification, and its golden re-runs without torch.
    assert manifest["parity"][name]["passed"]
    assert set(manifest["parity"][name]["cases"]) == set(parity.cases)
    again = check_golden(bundle, manifest, name, threads=2)
    assert again.passed and again.worst_rel < 1e-5


@slow
def test_several_images_equal_one_call_per_image(session, tiny_visual):
    """Block-diagonal attention: packing images (and a two-frame clip) in one call changes
    nothing; and that packed call matches Hugging Face's own packed call."""
    grids = [(1, 20, 14), (2, 8, 8), (1, 6, 10)]
    x, (feats, deep) = _run(session, grids)
    row = col = 0
    for g in grids:
        n = g[0] * g[1] * g[2]
        one_f, one_d = session.run(vd.OUTPUT_NAMES, {"pixel_values": x[row:row + n], "image_grid_thw": np.array([g])})
        assert np.abs(feats[col:col + n // 4] - one_f).max() <= 1e-5 * np.abs(one_f).max()
        assert np.abs(deep[:, col:col + n // 4] - one_d).max() <= 1e-5 * np.abs(one_d).max()
        row, col = row + n, col + n // 4
    ref = vd.reference_outputs(tiny_visual, x, grids)
    assert np.abs(feats - ref["image_features"]).max() <= 1e-5 * np.abs(ref["image_features"]).max()


@slow
def test_planted_bug_fails_parity(tmp_path, tiny_visual, monkeypatch):
    """Positions transposed (row and col swapped) in the graph: every output must fail."""
    real = forward_patch.patch_coordinates

    def transposed(grid_thw, num_patches, merge):
        c = real(grid_thw, num_patches, merge)
        return type(c)(row=c.col, col=c.row, height=c.width, width=c.height, frame_start=c.frame_start)

    monkeypatch.setattr(forward_patch, "patch_coordinates", transposed)
    entry = vd.export_vision_dynamic(tiny_visual, tmp_path)
    parity = vd.verify_vision_dynamic(tmp_path / entry.file, tiny_visual, threads=2)
    assert not parity.passed
    failed_cases = {f.split("[")[1].split("]")[0] for f in parity.failures()}
    assert {"grid 8x12", "grid 20x14", "grid 16x36", "3 images 8x12+20x14+6x6"} <= failed_cases
    assert parity.worst_rel > 1e-2


# -- --buckets parsing ----------------------------------------------------------------------


def test_parse_dynamic_bucket():
    parsed = parse_buckets("224, 448,Dynamic")
    assert [b.name for b in parsed] == ["224", "448", "dynamic"]
    static, dynamic = split_buckets(parsed)
    assert all(isinstance(b, VisionBucket) for b in static) and isinstance(dynamic, DynamicVision)
    assert split_buckets(parse_buckets("448"))[1] is None
    assert [b.name for b in parse_buckets("dynamic")] == ["dynamic"]
    with pytest.raises(UsageError, match="more than once") as e:
        parse_buckets("dynamic,448,dynamic")
    assert e.value.exit_code == 2
    with pytest.raises(UsageError, match="'dynamic' for the any-size graph"):
        parse_buckets("448,dynamc")


def test_cli_refuses_duplicate_dynamic(tmp_path, capsys):
    assert compile_main(["--model", "tiny-random", "--buckets", "dynamic,dynamic", "-o", str(tmp_path / "o")]) == 2
    assert "more than once" in capsys.readouterr().err


# -- the compiled bundle serves unbucketed sizes through the graph ---------------------------


@slow
@pytest.mark.parametrize("name,per_call,grid_dim", [("vision_dynamic", 1, 1), ("vision_dynamic_multi", "any", "num_images")])
def test_manifest_entry(bundle, manifest, name, per_call, grid_dim):
    g = manifest["graphs"][name]
    assert set(g) == {"file", "data_files", "kind", "precision", "dynamic", "images_per_call", "inputs", "outputs",
                      "export", "patches", "passes"}
    assert set(g["export"]) == {"exporter", "example_grids", "seconds"}
    assert g["export"]["exporter"].startswith("torch.onnx.export(dynamo=True, dynamic_shapes) torch ")
    assert g["kind"] == "vision" and g["dynamic"] is True and g["precision"] == "fp32"
    assert g["images_per_call"] == per_call
    assert [i["name"] for i in g["inputs"]] == ["pixel_values", "image_grid_thw"]
    assert g["inputs"][1]["shape"] == [grid_dim, 3]
    assert [p["pass"] for p in g["passes"]] == ["UnifyIndexTypesPass", "CleanupPass", "FuseAttentionPass", "CheckModelPass"]
    assert g["passes"][2]["stats"]["multi_head_attention"] == 6
    assert [b["name"] for b in manifest["buckets"]] == ["448"]  # the dynamic graph is not a bucket
    assert manifest["options"]["buckets"] == ["448", "dynamic"]
    assert manifest["files"][f"{name}.onnx"]["sha256"] == hashlib.sha256((bundle / f"{name}.onnx").read_bytes()).hexdigest()
    assert manifest["graphs"]["genai_vision"]["source_graph"] == "vision_dynamic_multi"


@slow
def test_per_image_graph_has_no_attention_mask(bundle):
    """No attention input carries a patches x patches mask: ONNX Runtime then runs its
    attention without materialising the scores (the multi graph has the mask)."""
    import onnx

    def bias_inputs(name):
        g = onnx.load(str(bundle / f"{name}.onnx"), load_external_data=False).graph
        mha = [n for n in g.node if n.op_type == "MultiHeadAttention"]
        return len(mha), sum(len(n.input) > 5 and n.input[5] != "" for n in mha)

    assert bias_inputs("vision_dynamic") == (6, 0)
    assert bias_inputs("vision_dynamic_multi") == (6, 6)


@pytest.fixture(scope="module")
def odd_image(tmp_path_factory):
    w, h = 500, 300
    arr = np.random.default_rng(2).integers(0, 256, (h, w, 3), dtype=np.uint8)
    arr = (arr.astype(np.float32) * 0.5 + np.linspace(0, 127, w)[None, :, None]).astype(np.uint8)
    path = tmp_path_factory.mktemp("img") / "odd.png"
    Image.fromarray(arr).save(path)
    return path


@slow
def test_dynamic_graph_serves_like_the_pytorch_fallback(bundle, manifest, odd_image):
    prompt = "What do you see?"
    dyn = Pipeline.load(bundle, threads=2).generate(images=[odd_image], prompt=prompt, max_new_tokens=24)
    assert dyn.images[0]["served_by"] == "dynamic graph"
    # The same bundle without the dynamic graph in its manifest takes the PyTorch fallback.
    plain = copy.deepcopy(manifest)
    del plain["graphs"]["vision_dynamic"], plain["graphs"]["vision_dynamic_multi"]
    ref = Pipeline(bundle, plain, threads=2).generate(images=[odd_image], prompt=prompt, max_new_tokens=24)
    assert ref.images[0]["served_by"] == "fallback (PyTorch eager)"
    assert ref.images[0]["grid_thw"] == dyn.images[0]["grid_thw"] != [1, 28, 28]
    assert len(dyn.token_ids) >= 8 and dyn.token_ids == ref.token_ids


@slow
def test_on_miss_fit_and_error_unchanged(bundle, odd_image):
    fit = Pipeline.load(bundle, threads=2, on_miss="fit").generate(images=[odd_image], prompt="Hi", max_new_tokens=2)
    assert fit.images[0]["served_by"] == "bucket 448" and fit.images[0]["fit"] == "resized from 500x300 to bucket 448"
    with pytest.raises(RuntimeInputError, match="has no bucket"):
        Pipeline.load(bundle, threads=2, on_miss="error").generate(images=[odd_image], prompt="Hi", max_new_tokens=2)


@slow
def test_encode_dynamic_checks_grids(bundle, manifest):
    enc = Pipeline(bundle, manifest, threads=2).vision
    x = pixel_values_from_u8(vd.random_pixel_u8([(1, 8, 12)], 1536, 0))
    for grids, fragment in [([(1, 8, 10)], "describes 80 patches"), ([(1, 7, 12)], "multiples of 2"), ([(0, 8, 12)], "positive")]:
        with pytest.raises(RuntimeInputError, match=fragment):
            enc.encode_dynamic(x, grids)
    assert enc.encode_dynamic(x, [(1, 8, 12)]).image_features.shape == (24, 128)


_MEMORY_CHILD = r"""
import resource, sys
import numpy as np
from PIL import Image
from qwen3vl_compile.bundle.check import open_checked
from qwen3vl_compile.runtime.preprocess import ProcessorConfig, preprocess
from qwen3vl_compile.runtime.vision import VisionEncoder
import onnxruntime as ort
bundle, system = sys.argv[1], sys.argv[2]
m = open_checked(bundle)
if system == "fallback":
    del m["graphs"]["vision_dynamic"], m["graphs"]["vision_dynamic_multi"]
img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (1024, 1024, 3), dtype=np.uint8))
p = preprocess(img, ProcessorConfig.from_dict(m["processor"]))
enc = VisionEncoder(bundle, m, lambda f: ort.InferenceSession(str(f), providers=["CPUExecutionProvider"]))
r = enc.encode(p.pixel_values, p.grid_thw)
print(r.served_by, "|", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


@pytest.mark.slow  # two fresh processes, each loading torch
def test_any_size_graph_memory_stays_below_the_fallback(bundle):
    """A 1024x1024 image (4096 patches): the per-image graph's process peaks below 1.5x the
    PyTorch fallback's (measured 0.32x; the multi-image graph with its mask: 1.5x)."""
    import subprocess
    import sys

    peaks = {}
    for system in ("dynamic", "fallback"):
        out = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, str(bundle), system], capture_output=True, text=True,
                             check=True).stdout.strip().splitlines()[-1]
        served, kib = out.split(" | ")
        assert served == {"dynamic": "dynamic graph", "fallback": "fallback (PyTorch eager)"}[system]
        peaks[system] = int(kib)
    assert peaks["dynamic"] <= 1.5 * peaks["fallback"], peaks
