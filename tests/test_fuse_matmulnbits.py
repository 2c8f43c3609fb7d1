"""FuseSiblingMatMulNBitsPass on its own: the tiny INT4 decoder before and after (ONNX Runtime
gives the same logits, bit for bit), graphs it must leave alone, and the fused weights equal
to quantizing the concatenated matrix."""

import numpy as np
import onnx
import onnx_ir as ir

from qwen3vl_compile.export.quantize import quantize_int4
from qwen3vl_compile.export.text_decoder import build_decoder_model, save_streaming
from qwen3vl_compile.passes.base import run_passes
from qwen3vl_compile.passes.fuse_sibling_matmulnbits import FuseSiblingMatMulNBitsPass
from qwen3vl_compile.runtime.decoder_session import DecoderSession


def _logits(path, embeds, positions, steps):
    s = DecoderSession(path, max_length=128)
    out = [s.prefill(embeds, positions)]
    for t, e in enumerate(steps):
        out.append(s.step(e, np.full((3, 1, 1), embeds.shape[1] + t, np.int64)))
    return out


def test_int4_decoder_fused_gives_identical_logits(tiny_checkpoint, tmp_path):
    model, spec = build_decoder_model(tiny_checkpoint, precision="int4", context_length=128)
    save_streaming(model, tmp_path / "before.onnx")
    model, _ = build_decoder_model(tiny_checkpoint, precision="int4", context_length=128)
    model, reports = run_passes(model, [FuseSiblingMatMulNBitsPass()])
    # Per layer: q/k/v into one, gate/up into one.
    assert reports[0].modified and reports[0].stats == {"fused_groups": 2 * spec.layers, "matmuls_replaced": 5 * spec.layers}
    ops = [n.op_type for n in model.graph if n.name.startswith("/model/layers.0/")]
    assert ops.count("MatMulNBits") == 4 and ops.count("Split") == 2  # qkv, o, gate_up, down
    save_streaming(model, tmp_path / "after.onnx")
    assert not any(i.name.endswith("q_proj.qweight") for i in onnx.load(str(tmp_path / "after.onnx"), load_external_data=False).graph.initializer)
    rng = np.random.default_rng(0)
    n = 12
    embeds = rng.standard_normal((1, n, spec.hidden)).astype(np.float32)
    positions = np.broadcast_to(np.arange(n), (3, 1, n)).copy()
    steps = [rng.standard_normal((1, 1, spec.hidden)).astype(np.float32) for _ in range(3)]
    for a, b in zip(_logits(tmp_path / "before.onnx", embeds, positions, steps), _logits(tmp_path / "after.onnx", embeds, positions, steps)):
        assert np.array_equal(a, b)
    # Running it again finds nothing left to fuse.
    model, reports = run_passes(model, [FuseSiblingMatMulNBitsPass()])
    assert not reports[0].modified


def test_fused_bytes_equal_quantizing_the_concatenation():
    """Rule 2: blocks run along K inside one column, so concatenating quantized members along N
    is the quantization of the concatenated weight."""
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((64, 24)).astype(np.float32), rng.standard_normal((64, 40)).astype(np.float32)
    qa, sa = quantize_int4(a, 32)
    qb, sb = quantize_int4(b, 32)
    qc, sc = quantize_int4(np.concatenate([a, b], axis=1), 32)
    assert np.array_equal(np.concatenate([qa, qb]), qc) and np.array_equal(np.concatenate([sa, sb]), sc)


def test_leaves_unfusable_graphs_alone(tiny_checkpoint):
    # fp32: plain MatMul nodes, nothing to fuse.
    model, _ = build_decoder_model(tiny_checkpoint, precision="fp32", context_length=64)
    model, reports = run_passes(model, [FuseSiblingMatMulNBitsPass()])
    assert not reports[0].modified and reports[0].stats["fused_groups"] == 0
    # Siblings that disagree on block size are not fused.
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1, 64]))
    nodes, inits = [], []
    for i, bs in enumerate((32, 64)):
        w = np.random.default_rng(i).standard_normal((64, 16)).astype(np.float32)
        q, s = quantize_int4(w, bs)
        vals = [ir.Value(name=f"w{i}.{p}", const_value=ir.tensor(t), type=ir.TensorType(ir.DataType.from_numpy(t.dtype)),
                         shape=ir.Shape(t.shape)) for p, t in (("q", q), ("s", s))]
        inits += vals
        nodes.append(ir.node("MatMulNBits", [x, *vals], domain="com.microsoft", name=f"m{i}",
                             attributes={"K": 64, "N": 16, "bits": 4, "block_size": bs, "accuracy_level": 4}))
        nodes[-1].outputs[0].name = f"y{i}"
    graph = ir.Graph([x], [n.outputs[0] for n in nodes], nodes=nodes, initializers=inits,
                     opset_imports={"": 18, "com.microsoft": 1}, name="siblings")
    model, reports = run_passes(ir.Model(graph, ir_version=10), [FuseSiblingMatMulNBitsPass()])
    assert not reports[0].modified
