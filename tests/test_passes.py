"""Each pass on a graph it should change and on one it should leave alone, with ONNX Runtime
run before and after."""

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from qwen3vl_compile.errors import PassError
from qwen3vl_compile.passes.base import run_passes
from qwen3vl_compile.passes.check_model import CheckModelPass
from qwen3vl_compile.passes.cleanup import CleanupPass
from qwen3vl_compile.passes.unify_index_types import UnifyIndexTypesPass


def _model(text: str) -> ir.Model:
    return ir.serde.deserialize_model(onnx.parser.parse_model(text))


def _session(model: ir.Model) -> ort.InferenceSession:
    return ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(), providers=["CPUExecutionProvider"])


# The seeds' failure: int32 segment boundaries concatenated with int64 shape values.
CONCAT_MISMATCH = """
<ir_version: 9, opset_import: ["" : 18]>
g (int32[2] cu, float[4, 3] x) => (int64[3] shape_out, float[4, 3] y) {
    s = Shape <start = 0, end = 1> (x)
    shape_out = Concat <axis = 0> (cu, s)
    y = Identity (x)
}
"""

SLICE_AND_RESHAPE_MISMATCH = """
<ir_version: 9, opset_import: ["" : 18]>
g (float[12] x, int32[1] start, int64[1] end, int32[2] shape) => (float[?, ?] y) {
    sl = Slice (x, start, end)
    y = Reshape (sl, shape)
}
"""

# Int32 result of a mixed Concat that is also a graph output: the output keeps its int32 type.
OUTPUT_STAYS_INT32 = """
<ir_version: 9, opset_import: ["" : 18]>
g (int32[2] a, int64[1] b) => (int32[3] c) {
    c = Concat <axis = 0> (a, b)
}
"""

NO_MISMATCH = """
<ir_version: 9, opset_import: ["" : 18]>
g (int64[2] a, float[4, 3] x) => (int64[3] c) {
    s = Shape <start = 0, end = 1> (x)
    c = Concat <axis = 0> (a, s)
}
"""


def test_unify_concat_mismatch_rejected_before_accepted_after():
    model = _model(CONCAT_MISMATCH)
    with pytest.raises(Exception, match="bound to different types|Type parameter"):
        _session(model)
    model, reports = run_passes(model, [UnifyIndexTypesPass()])
    assert reports[0].modified and reports[0].stats["casts_inserted"] == 1
    out = _session(model).run(["shape_out"], {"cu": np.array([0, 196], np.int32), "x": np.zeros((4, 3), np.float32)})
    np.testing.assert_array_equal(out[0], np.array([0, 196, 4], np.int64))


def test_unify_slice_and_reshape():
    model = _model(SLICE_AND_RESHAPE_MISMATCH)
    with pytest.raises(Exception):
        _session(model)
    model, reports = run_passes(model, [UnifyIndexTypesPass()])
    assert reports[0].stats["casts_inserted"] == 2  # Slice start, Reshape shape
    x = np.arange(12, dtype=np.float32)
    feeds = {"x": x, "start": np.array([2], np.int32), "end": np.array([8], np.int64), "shape": np.array([2, 3], np.int32)}
    np.testing.assert_array_equal(_session(model).run(None, feeds)[0], x[2:8].reshape(2, 3))


def test_unify_keeps_graph_output_type():
    model = _model(OUTPUT_STAYS_INT32)
    model, reports = run_passes(model, [UnifyIndexTypesPass()])
    assert reports[0].stats["outputs_recast"] == 1
    assert model.graph.outputs[0].dtype == ir.DataType.INT32 and model.graph.outputs[0].name == "c"
    out = _session(model).run(None, {"a": np.array([1, 2], np.int32), "b": np.array([3], np.int64)})[0]
    assert out.dtype == np.int32 and out.tolist() == [1, 2, 3]


def test_unify_leaves_consistent_graph_alone():
    model = _model(NO_MISMATCH)
    n = len(list(model.graph))
    model, reports = run_passes(model, [UnifyIndexTypesPass()])
    assert not reports[0].modified and len(list(model.graph)) == n


FOLDABLE = """
<ir_version: 9, opset_import: ["" : 18]>
g (float[2, 3] x) => (float[2, 3] y) <float[2, 3] w = {1.0, 2.0, 3.0, 4.0, 5.0, 6.0}, float[2, 3] v = {0.5, 0.5, 0.5, 0.5, 0.5, 0.5}> {
    wv = Mul (w, v)
    dead = Neg (x)
    xi = Identity (x)
    y = Add (xi, wv)
}
"""

NOTHING_TO_CLEAN = """
<ir_version: 9, opset_import: ["" : 18]>
g (float[2, 3] x, float[2, 3] z) => (float[2, 3] y) {
    y = Add (x, z)
}
"""


def test_cleanup_folds_and_removes_dead_nodes():
    model = _model(FOLDABLE)
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    before = _session(model).run(None, {"x": x})[0]
    model, reports = run_passes(model, [CleanupPass()])
    stats = reports[0].stats
    assert reports[0].modified and stats["nodes_before"] == 4 and stats["nodes_after"] == 1
    assert [n.op_type for n in model.graph] == ["Add"]
    np.testing.assert_array_equal(_session(model).run(None, {"x": x})[0], before)


def test_cleanup_leaves_minimal_graph_alone():
    model = _model(NOTHING_TO_CLEAN)
    model, reports = run_passes(model, [CleanupPass()])
    assert not reports[0].modified and reports[0].stats["nodes_after"] == 1


def test_check_model_accepts_valid_graph():
    model, reports = run_passes(_model(NO_MISMATCH), [CheckModelPass()])
    assert not reports[0].modified and reports[0].stats["outputs_with_full_shape"] == 1


def test_check_model_rejects_invalid_graph_with_typed_error():
    with pytest.raises(PassError, match="CheckModelPass failed.*passes run before it: UnifyIndexTypesPass"):
        # UnifyIndexTypes is given nothing it can fix here: the Add mixes float and int.
        bad = _model(
            """
            <ir_version: 9, opset_import: ["" : 18]>
            g (float[2] a, int64[2] b) => (float[2] c) { c = Add (a, b) }
            """
        )
        run_passes(bad, [UnifyIndexTypesPass(), CheckModelPass()], graph="bad")


def test_fuse_attention_on_exported_vision_graph(vision_graphs):
    """Fuses each block's attention into MultiHeadAttention; outputs unchanged within tolerance."""
    from qwen3vl_compile.passes.fuse_attention import FuseAttentionPass

    path, bucket, _ = vision_graphs("224")
    fused = ir.load(path)  # the graph as the compiler writes it: already fused
    assert sum(n.op_type == "MultiHeadAttention" for n in fused.graph) == 6
    # The non-matching case: nothing left to fuse, so the pass reports no change.
    _, reports = run_passes(fused, [FuseAttentionPass()])
    assert not reports[0].modified and reports[0].stats["sdpa_matched"] == 0


@pytest.mark.slow  # an export of its own (128x256, without the fusion)
def test_fuse_attention_matches_unfused(tiny_visual, tmp_path):
    from qwen3vl_compile.buckets import parse_bucket
    from qwen3vl_compile.export.vision import export_vision_bucket, random_pixel_values
    from qwen3vl_compile.passes.cleanup import CleanupPass
    from qwen3vl_compile.passes.fuse_attention import FuseAttentionPass

    bucket = parse_bucket("128x256")
    entry = export_vision_bucket(tiny_visual, bucket, tmp_path, passes=(CleanupPass(),))
    assert [p.name for p in entry.passes] == ["CleanupPass"]
    plain = ir.load(tmp_path / entry.file)
    x = random_pixel_values(bucket, seed=5)
    before = _session(plain).run(None, {"pixel_values": x})
    assert not any(n.op_type == "MultiHeadAttention" for n in plain.graph)
    fused, reports = run_passes(plain, [FuseAttentionPass()])
    assert reports[0].modified and reports[0].stats["multi_head_attention"] == 6
    after = _session(fused).run(None, {"pixel_values": x})
    for a, b in zip(before, after):
        assert np.abs(a - b).max() / np.abs(a).max() < 1e-5
