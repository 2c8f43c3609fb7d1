"""PackDeepStackOutputsPass: join a graph's features and DeepStack outputs into one wide output.

onnxruntime-genai's runtime passes exactly one tensor from the vision graph to the embedding
graph (``image_features``) and one from the embedding graph to the decoder
(``inputs_embeds``). DeepStack would be dropped on the way; carried in extra channels of
that one tensor, it survives (onnxruntime-genai checks only the declared width, so the
decoder then declares ``hidden_size = H * (1 + K)``). Rules:

1. Find the graph outputs ``features [..., H]`` and ``deepstack [K, ..., H]`` (the levels on
   axis 0, every other axis equal to ``features``'s).
2. Move the level axis next to the channel axis and merge the two:
   ``Transpose -> [..., K, H]``, ``Reshape -> [..., K*H]`` (leading dims copied with 0).
3. ``Concat(features, levels, axis=-1)`` becomes the single output ``packed``
   ``[..., H*(1+K)]``: channels ``[0, H)`` are the features, ``[H*(1+k), H*(2+k))`` level k.
   The two old outputs stop being graph outputs (their values are renamed, so ``packed``
   may reuse either name).

        features [M, H]     deepstack [K, M, H]
              |                  | Transpose(1, 0, 2)
              |                  | Reshape(0, K*H)
              +---- Concat(axis=-1) ----+
                         |
                packed [M, H*(1+K)]

A graph that already has the ``packed`` output and no ``deepstack`` output is left alone
(modified False); a graph with only one of them, or with shapes that do not line up, is
refused with a PassError naming the output.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qwen3vl_compile.errors import PassError

from .base import ReportedPassResult


def _static(shape: ir.Shape | None, name: str) -> ir.Shape:
    if shape is None or not isinstance(shape[-1], int):
        raise PassError(f"{name}: needs a known rank and a static last dimension, got {shape}")
    return shape


def find_pair(values, features: str, deepstack: str, packed: str, side: str):
    """Rule 1, shared with the unpacking pass: the (features, deepstack) values among
    ``values`` (a graph's inputs or outputs) and their shapes' ``(levels, hidden, rank)``;
    None when the graph is already packed (``packed`` present, ``deepstack`` gone)."""
    by_name = {v.name: v for v in values}
    feats, deep = by_name.get(features), by_name.get(deepstack)
    if deep is None and packed in by_name and (feats is None or features == packed):
        return None
    for name, value in ((features, feats), (deepstack, deep)):
        if value is None:
            raise PassError(f"graph has no {side} {name!r} ({side}s: {', '.join(by_name)})")
    fshape, dshape = _static(feats.shape, features), _static(deep.shape, deepstack)
    levels, hidden, rank = dshape[0], fshape[-1], len(fshape)
    if not isinstance(levels, int) or len(dshape) != rank + 1 or dshape[-1] != hidden:
        raise PassError(f"{deepstack} {list(dshape)} does not line up with {features} {list(fshape)}: expected [K, *features.shape]")
    return feats, deep, (levels, hidden, rank)


class PackDeepStackOutputsPass(ir.passes.InPlacePass):
    """``features``/``deepstack``: the two outputs to join; ``packed``: the new output's name."""

    def __init__(self, features: str, deepstack: str, packed: str):
        self.features, self.deepstack, self.packed = features, deepstack, packed

    def call(self, model: ir.Model) -> ReportedPassResult:
        graph = model.graph
        found = find_pair(graph.outputs, self.features, self.deepstack, self.packed, "output")
        if found is None:
            return ReportedPassResult(model, False, stats={"already_packed": True})
        feats, deep, (levels, hidden, rank) = found
        fshape = feats.shape
        # Rule 3: the old values keep flowing inside the graph under internal names.
        feats.name, deep.name = f"/deepstack_pack/{self.features}", f"/deepstack_pack/{self.deepstack}"
        base = "/deepstack_pack"
        perm = [*range(1, rank), 0, rank]  # [K, d0..d(r-2), H] -> [d0..d(r-2), K, H]
        moved = ir.node("Transpose", [deep], attributes={"perm": perm}, name=f"{base}/Transpose")
        target = ir.Value(name=f"{base}/shape", const_value=ir.tensor(np.array([0] * (rank - 1) + [levels * hidden], np.int64)))
        target.type, target.shape = ir.TensorType(ir.DataType.INT64), ir.Shape([rank])
        graph.register_initializer(target)
        merged = ir.node("Reshape", [moved.outputs[0], target], name=f"{base}/Reshape")
        concat = ir.node("Concat", [feats, merged.outputs[0]], attributes={"axis": -1}, name=f"{base}/Concat")
        for n, out in ((moved, "levels_moved"), (merged, "levels")):
            n.outputs[0].name = f"{base}/{out}"
        out = concat.outputs[0]
        out.name, out.dtype = self.packed, feats.dtype
        out.shape = ir.Shape([*list(fshape)[:-1], hidden * (1 + levels)])
        graph.extend([moved, merged, concat])
        kept = [out if v is feats else v for v in graph.outputs if v is not deep]
        graph.outputs.clear()
        graph.outputs.extend(kept)
        return ReportedPassResult(
            model, True, stats={"levels": levels, "hidden": hidden, "packed_channels": hidden * (1 + levels), "nodes_added": 3}
        )
