"""UnpackDeepStackInputsPass: take a graph's features and DeepStack inputs from one wide input.

The inverse of :mod:`.pack_deepstack`, on the consuming side: the embedding graph receives
``image_features [M, H*(1+K)]`` from the vision graph, the decoder ``inputs_embeds
[B, S, H*(1+K)]`` from the embedding graph, each with the DeepStack levels in the channels
after the first H. Rules:

1. Find the graph inputs ``features [..., H]`` and ``deepstack [K, ..., H]``.
2. Replace both by one input ``packed [..., H*(1+K)]`` (same leading dims as ``features``).
3. ``features = Slice(packed, 0:H, axis=-1)``;
   ``deepstack = Transpose(Reshape(Slice(packed, H:, axis=-1), [..., K, H]))`` with the level
   axis moved back to the front. Every node that read either old input reads these.

                packed [B, S, H*(1+K)]
               /                      \\
     Slice(0:H, -1)              Slice(H:, -1) -> Reshape(0, 0, K, H) -> Transpose(2, 0, 1, 3)
           |                                          |
     features [B, S, H]                       deepstack [K, B, S, H]

A graph that already has the ``packed`` input and no ``deepstack`` input is
left alone (modified False); a missing input or shapes that do not line up are refused with
a PassError naming the input.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from .base import ReportedPassResult
from .pack_deepstack import find_pair


def _i64(graph: ir.Graph, name: str, values) -> ir.Value:
    v = ir.Value(name=name, const_value=ir.tensor(np.array(values, np.int64)))
    v.type, v.shape = ir.TensorType(ir.DataType.INT64), ir.Shape([len(values)])
    graph.register_initializer(v)
    return v


class UnpackDeepStackInputsPass(ir.passes.InPlacePass):
    """``features``/``deepstack``: the two inputs to replace; ``packed``: the new input's name."""

    def __init__(self, features: str, deepstack: str, packed: str):
        self.features, self.deepstack, self.packed = features, deepstack, packed

    def call(self, model: ir.Model) -> ReportedPassResult:
        graph = model.graph
        found = find_pair(graph.inputs, self.features, self.deepstack, self.packed, "input")
        if found is None:
            return ReportedPassResult(model, False, stats={"already_unpacked": True})
        feats, deep, (levels, hidden, rank) = found
        fshape, dshape = feats.shape, deep.shape
        base = "/deepstack_unpack"
        feats.name, deep.name = f"{base}/{self.features}", f"{base}/{self.deepstack}"
        packed = ir.Value(
            name=self.packed, type=ir.TensorType(feats.dtype), shape=ir.Shape([*list(fshape)[:-1], hidden * (1 + levels)])
        )
        axis = _i64(graph, f"{base}/axis", [-1])
        head = ir.node("Slice", [packed, _i64(graph, f"{base}/zero", [0]), _i64(graph, f"{base}/hidden", [hidden]), axis],
                       name=f"{base}/SliceFeatures")
        tail = ir.node("Slice", [packed, _i64(graph, f"{base}/hidden_start", [hidden]),
                                 _i64(graph, f"{base}/end", [hidden * (1 + levels)]), axis], name=f"{base}/SliceLevels")
        split = ir.node("Reshape", [tail.outputs[0], _i64(graph, f"{base}/levels_shape", [0] * (rank - 1) + [levels, hidden])],
                        name=f"{base}/Reshape")
        front = ir.node("Transpose", [split.outputs[0]], attributes={"perm": [rank - 1, *range(rank - 1), rank]},
                        name=f"{base}/Transpose")
        for n, out in ((head, "features"), (tail, "levels_flat"), (split, "levels_split"), (front, "levels")):
            n.outputs[0].name = f"{base}/{out}"
        head.outputs[0].dtype, head.outputs[0].shape = feats.dtype, ir.Shape(fshape)
        front.outputs[0].dtype, front.outputs[0].shape = deep.dtype, ir.Shape(dshape)
        # Rule 2: the new input takes the old ones' place (the position of the features input).
        position = list(graph.inputs).index(feats)
        kept = [v for v in graph.inputs if v is not feats and v is not deep]
        kept.insert(min(position, len(kept)), packed)
        graph.inputs.clear()
        graph.inputs.extend(kept)
        graph.insert_before(next(iter(graph)), [head, tail, split, front])
        rewired = 0
        for old, new in ((feats, head.outputs[0]), (deep, front.outputs[0])):
            rewired += len(old.uses())
            ir.convenience.replace_all_uses_with(old, new)
        return ReportedPassResult(
            model, True, stats={"levels": levels, "hidden": hidden, "packed_channels": hidden * (1 + levels), "uses_rewired": rewired}
        )
