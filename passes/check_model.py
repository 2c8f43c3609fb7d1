"""CheckModelPass: the final graph must pass ``onnx.checker`` (full check) and strict ONNX
shape inference. Changes nothing; fails (typed) when the model is invalid.

Rules:

1. Serialize the model (weights stay external when they are already external data or the
   model is too big for one protobuf) and run ``onnx.checker.check_model(full_check=True)``,
   which includes strict shape inference.
2. Report the node count, opset imports and the number of outputs whose shapes inference
   could fully determine.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import onnx
import onnx_ir as ir

from .base import ReportedPassResult

_PROTO_LIMIT = 512 << 20  # bigger models are checked from disk (external data)


class CheckModelPass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ReportedPassResult:
        size = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
        if size < _PROTO_LIMIT:
            proto = ir.serde.serialize_model(model)
            onnx.checker.check_model(proto, full_check=True)
            inferred = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True, data_prop=True)
            return ReportedPassResult(model, False, stats=_stats(inferred))
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "model.onnx"
            ir.save(model, path, external_data="model.onnx.data")
            return ReportedPassResult(model, False, stats=check_model_file(path))


def check_model_file(path: Path) -> dict:
    """The same check on a saved model (weights stay on disk, read by the checker)."""
    onnx.checker.check_model(str(path), full_check=True)
    return _stats(onnx.load(str(path), load_external_data=False))


def _stats(inferred: onnx.ModelProto) -> dict:
    outputs_with_shape = sum(
        1
        for o in inferred.graph.output
        if o.type.tensor_type.HasField("shape")
        and all(d.HasField("dim_value") or d.HasField("dim_param") for d in o.type.tensor_type.shape.dim)
    )
    return {
        "nodes": len(inferred.graph.node),
        "opsets": {i.domain or "ai.onnx": i.version for i in inferred.opset_import},
        "outputs_with_full_shape": outputs_with_shape,
        "outputs": len(inferred.graph.output),
    }
