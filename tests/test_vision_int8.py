"""``--vision-precision int8``: the quantization pass on small graphs (both activation modes,
what it leaves alone), the int8 parity gate on the tiny tower (it passes, and planted bugs fail
it), and the compile CLI around it."""

import json

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from qwen3vl_compile.cli import main
from qwen3vl_compile.config import CompileConfig
from qwen3vl_compile.errors import UsageError
from qwen3vl_compile.passes import quantize_gemm_int8 as q8
from qwen3vl_compile.passes.quantize_gemm_int8 import QuantizeGemmInt8Pass

M, K, N = 64, 96, 48


def _gemm_model(w: np.ndarray, b: np.ndarray, **attrs) -> ir.Model:
    a = " ".join(f"{k} = {v}," for k, v in attrs.items()).rstrip(",")
    model = onnx.parser.parse_model(f"""
        <ir_version: 9, opset_import: ["" : 18]>
        g (float[{M}, {K}] x) => (float[{M}, {N}] y) {{
            y = Gemm <{a or "transB = 1"}> (x, w, bias)
        }}""")
    model.graph.initializer.extend([onnx.numpy_helper.from_array(w, "w"), onnx.numpy_helper.from_array(b, "bias")])
    return ir.serde.deserialize_model(model)


def _run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    s = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {"x": x})[0]


def _data(seed=0):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((N, K)) * 0.05).astype(np.float32)
    b = rng.standard_normal(N).astype(np.float32)
    x = rng.standard_normal((M, K)).astype(np.float32)
    return w, b, x


def _rel(a, b, rows=slice(None)):
    return float(np.abs(a[rows] - b[rows]).max() / np.abs(b[rows]).max())


@pytest.mark.parametrize("mode", ["per-token", "per-tensor"])
def test_pass_rewrites_gemm_and_keeps_outputs_close(mode):
    w, b, x = _data()
    model = _gemm_model(w, b)
    result = QuantizeGemmInt8Pass(mode)(model)
    assert result.modified
    assert result.stats == {"activations": mode, "gemms_quantized": 1, "gemms_skipped": 0,
                            "gemms_kept_fp32_attention_inputs": 0,
                            "weight_bytes_fp32": N * K * 4, "weight_bytes_int8": N * K + 4 * N}
    ops = [n.op_type for n in model.graph]
    assert "Gemm" not in ops and ("MatMulInteger" in ops if mode == "per-token" else ops == ["DynamicQuantizeMatMul"])
    assert "w" not in model.graph.initializers  # the fp32 weights left the graph
    assert model.graph.outputs[0].name == "y"
    ref = x @ w.T + b
    assert _rel(_run(model, x), ref) < 0.02


def test_per_token_activations_survive_an_outlier_token():
    """One token 50x larger than the rest: per-tensor scaling coarsens every other token,
    per-token scaling does not (why ``--vision-precision int8`` quantizes per token)."""
    w, b, x = _data(1)
    b[:] = 0
    x[5] *= 50
    ref = x @ w.T
    others = np.arange(M) != 5
    errs = {mode: _rel(_run(_apply(_gemm_model(w, b), mode), x), ref, others) for mode in q8.ACTIVATIONS}
    assert errs["per-token"] < 0.02 < 0.1 < errs["per-tensor"], errs


def _apply(model, mode):
    QuantizeGemmInt8Pass(mode)(model)
    return model


def test_zero_rows_and_zero_columns_stay_exact():
    w, b, x = _data(2)
    w[3] = 0  # a column of the product that is all zeros
    x[7] = 0  # a token that is all zeros
    y = _run(_apply(_gemm_model(w, b), "per-token"), x)
    np.testing.assert_array_equal(y[7], b)
    np.testing.assert_array_equal(y[:, 3], np.full(M, b[3], np.float32))


def test_pass_leaves_other_gemms_alone():
    w, b, x = _data(3)
    for attrs in ({"transB": 1, "alpha": 2.0}, {"transB": 0}):
        weights = w if attrs["transB"] else np.ascontiguousarray(w.T)
        model = _gemm_model(weights, b, **attrs)
        result = QuantizeGemmInt8Pass()(model)
        assert not result.modified and result.stats["gemms_skipped"] == 1
        assert [n.op_type for n in model.graph] == ["Gemm"]
    with pytest.raises(ValueError, match="per-channel"):
        QuantizeGemmInt8Pass("per-channel")


def test_quantize_columns_is_symmetric_per_output_column():
    w = np.array([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0], [-0.254, 0.127, 0.0]], np.float32)
    codes, scale = q8.quantize_columns(w)
    assert codes.shape == (3, 3) and codes.dtype == np.int8
    np.testing.assert_allclose(scale, [2 / 127, 1.0, 0.254 / 127], rtol=1e-6)
    np.testing.assert_array_equal(codes[:, 0], [64, -127, 32])
    np.testing.assert_array_equal(codes[:, 1], [0, 0, 0])
    np.testing.assert_array_equal(codes[:, 2], [-127, 64, 0])


# The tiny tower: the int8 graph passes its own gate, planted bugs fail it.

@pytest.fixture(scope="module")
def int8_224(vision_graphs, tmp_path_factory):
    path, bucket, _ = vision_graphs("224")
    model = ir.load(path)
    QuantizeGemmInt8Pass()(model)
    out = tmp_path_factory.mktemp("int8") / "vision_224.onnx"
    ir.save(model, out, external_data="vision_224.onnx.data")
    return out, bucket


def test_int8_bucket_passes_its_gate_and_fails_the_fp32_one(int8_224, tiny_visual):
    from qwen3vl_compile.export.vision import verify_vision_bucket

    path, bucket = int8_224
    gate = verify_vision_bucket(path, tiny_visual, bucket, precision="int8")
    assert gate.passed and gate.precision == "int8", gate.failures()
    # It is a real approximation: the fp32 gate would refuse it.
    assert not verify_vision_bucket(path, tiny_visual, bucket, precision="fp32").passed


def test_int8_gate_catches_a_wrong_grid(int8_224, tiny_visual):
    from qwen3vl_compile.export.vision import verify_vision_bucket

    path, bucket = int8_224
    assert not verify_vision_bucket(path, tiny_visual, bucket, reference_grid=(1, 2, 98), precision="int8").passed


def test_int8_gate_catches_scales_on_the_wrong_axis(vision_graphs, tiny_visual, tmp_path, monkeypatch):
    """A planted quantizer bug (each column's scale taken from a neighbour's) fails the gate."""
    from qwen3vl_compile.export.vision import verify_vision_bucket

    right = q8.quantize_columns
    monkeypatch.setattr(q8, "quantize_columns", lambda w: (lambda c, s: (c, np.roll(s, 1)))(*right(w)))
    path, bucket, _ = vision_graphs("224")
    model = ir.load(path)
    QuantizeGemmInt8Pass()(model)
    ir.save(model, tmp_path / "bad.onnx", external_data="bad.onnx.data")
    assert not verify_vision_bucket(tmp_path / "bad.onnx", tiny_visual, bucket, precision="int8").passed


def test_vision_precision_is_validated_in_one_place():
    with pytest.raises(UsageError, match="--vision-precision 'int4'"):
        CompileConfig(model="tiny", output=None, buckets=(), graphs=("decoder",), vision_precision="int4")


@pytest.mark.slow  # a compile of two bucket graphs and the any-size graph
def test_int8_compile_records_precision_and_verifies(tmp_path, capsys):
    out = tmp_path / "bundle"
    assert main(["--model", "tiny", "--buckets", "224,448,dynamic", "--graphs", "vision", "--vision-precision", "int8",
                 "-o", str(out), "-q"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["options"]["vision_precision"] == "int8"
    for name in ("vision_224", "vision_448", "vision_dynamic"):
        assert m["parity"][name]["precision"] == "int8" and m["parity"][name]["passed"]
        cosines = [out["cosine"] for case in m["parity"][name]["cases"].values() for out in case.values()]
        assert min(cosines) > 0.99, cosines  # recorded per output: the lowest per-token cosine
        stats = next(p for p in m["graphs"][name]["passes"] if p["pass"] == "QuantizeGemmInt8Pass")["stats"]
        assert stats["gemms_quantized"] > 0 and stats["activations"] == "per-token"
    capsys.readouterr()
    assert main(["verify", str(out)]) == 0
    assert "all graphs within tolerance" in capsys.readouterr().out
