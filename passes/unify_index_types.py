"""UnifyIndexTypesPass: make integer index inputs agree on int64.

Exporters of the Qwen3-VL vision tower produced graphs where int32 tensors (``cu_seqlens``)
meet int64 ones (shapes, ``grid_thw``) in the same node; ONNX Runtime then refuses the
model ("Type parameter (T) of Optype (Concat) bound to different types (tensor(int32) and
tensor(int64))"). Rules, applied in topological order:

1. Concat, Sum, Max, Min, Where (data inputs), Equal/Less/Greater(OrEqual), Add, Sub,
   Mul, Div, Mod: when the inputs mix int32 and int64, every int32 input is cast to int64
   and the node's integer output becomes int64.
2. Slice: ``starts``/``ends``/``axes``/``steps`` (inputs 1-4) that mix int32 and int64 are
   all cast to int64.
3. Reshape ``shape``, Expand ``shape``, Tile ``repeats``, ConstantOfShape ``input``,
   Range inputs when mixed: int32 is cast to int64 (ONNX requires int64 for the first four).
4. A graph output whose type changed from int32 to int64 by rule 1 is cast back to int32,
   so the graph's interface does not change.

          a:int32   b:int64                 a:int32        b:int64
             \\       /                         |             |
              Concat          ==>          Cast(to=int64)    |
                                                 \\          /
                                                    Concat

Types missing on intermediate values are first filled in by ONNX shape inference (non-strict,
so the mismatch itself does not stop it). Values whose type is still unknown are left alone and counted in ``stats["unknown_type"]``.
"""

from __future__ import annotations

import onnx_ir as ir

from .base import ReportedPassResult

_INT32, _INT64 = ir.DataType.INT32, ir.DataType.INT64

_SAME_TYPE_OPS = {
    "Concat", "Sum", "Max", "Min", "Add", "Sub", "Mul", "Div", "Mod",
    "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "Range",
}
_INT64_ONLY = {"Reshape": (1,), "Expand": (1,), "Tile": (1,), "ConstantOfShape": (0,)}
_SLICE_INDEX_INPUTS = (1, 2, 3, 4)


def _fill_missing_types(model: ir.Model) -> None:
    if all(v.type is not None for n in model.graph for v in n.outputs):
        return
    try:
        ir.passes.common.ShapeInferencePass(check_type=False, strict_mode=False, data_prop=False)(model)
    except Exception:  # noqa: BLE001 - inference is a best effort here; unknown types are skipped
        pass


def _dtype(v: ir.Value | None):
    if v is None or v.type is None:
        return None
    return v.dtype


class UnifyIndexTypesPass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ReportedPassResult:
        stats = {"casts_inserted": 0, "nodes_changed": 0, "outputs_recast": 0, "unknown_type": 0}
        _fill_missing_types(model)
        graph = model.graph
        changed_outputs: set[ir.Value] = set()
        for node in list(ir.traversal.RecursiveGraphIterator(graph)):
            positions = self._positions_to_cast(node, stats)
            if not positions:
                continue
            for i in positions:
                self._cast_input(node, i)
                stats["casts_inserted"] += 1
            stats["nodes_changed"] += 1
            if node.op_type in _SAME_TYPE_OPS and node.op_type not in {"Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual"}:
                for out in node.outputs:
                    if _dtype(out) == _INT32:
                        out.dtype = _INT64
                        changed_outputs.add(out)
        for idx, out in enumerate(list(graph.outputs)):
            if out in changed_outputs:
                self._recast_output(graph, idx, out)
                stats["outputs_recast"] += 1
        return ReportedPassResult(model, stats["nodes_changed"] > 0, stats=stats)

    @staticmethod
    def _positions_to_cast(node: ir.Node, stats: dict) -> list[int]:
        if node.domain not in ("", "ai.onnx"):
            return []
        op = node.op_type
        if op == "Slice":
            idxs = [i for i in _SLICE_INDEX_INPUTS if i < len(node.inputs) and node.inputs[i] is not None]
        elif op in _INT64_ONLY:
            return [i for i in _INT64_ONLY[op] if i < len(node.inputs) and _dtype(node.inputs[i]) == _INT32]
        elif op == "Where":
            idxs = [1, 2]
        elif op in _SAME_TYPE_OPS:
            idxs = [i for i, v in enumerate(node.inputs) if v is not None]
        else:
            return []
        types = [_dtype(node.inputs[i]) for i in idxs]
        if any(t is None for t in types):
            if any(t in (_INT32, _INT64) for t in types):
                stats["unknown_type"] += 1
            return []
        if _INT32 in types and _INT64 in types:
            return [i for i, t in zip(idxs, types) if t == _INT32]
        return []

    @staticmethod
    def _cast_input(node: ir.Node, index: int) -> None:
        value = node.inputs[index]
        cast = ir.node(
            "Cast",
            inputs=[value],
            attributes={"to": _INT64},
            name=f"{node.name or node.op_type}/unify_int64_{index}",
        )
        out = cast.outputs[0]
        out.name = f"{value.name}_as_int64_for_{node.name or node.op_type}_{index}"
        out.dtype = _INT64
        out.shape = value.shape
        node.graph.insert_before(node, cast)
        node.replace_input_with(index, out)

    @staticmethod
    def _recast_output(graph: ir.Graph, idx: int, out: ir.Value) -> None:
        cast = ir.node("Cast", inputs=[out], attributes={"to": _INT32}, name=f"{out.name}/restore_int32")
        new = cast.outputs[0]
        new.dtype = _INT32
        new.shape = out.shape
        graph.append(cast)
        name = out.name
        out.name = f"{name}_int64"
        new.name = name
        graph.outputs[idx] = new
