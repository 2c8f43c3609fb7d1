"""FuseSiblingMatMulNBitsPass: one INT4 MatMul where several read the same activation.

A decoder layer runs q/k/v projections on one normed hidden state, and gate/up projections on
another: five MatMulNBits launches where two suffice. At decode time each launch moves a few
MB of weights for one row of activations, so per-launch costs (thread-pool dispatch, the
activation's int8 quantization at accuracy level 4, repacking the input) are a visible share.
Rules:

1. Group the ``com.microsoft`` MatMulNBits nodes by their activation input. Within a group,
   fuse the nodes that agree on ``K``, ``bits``, ``block_size`` and ``accuracy_level``, have
   exactly the inputs (A, B, scales) with B and scales constant, and no zero points, g_idx
   or bias.
2. The fused node's B and scales are the members' concatenated along N (axis 0). Blocks run
   along K within one output column, so this is exactly the quantization of the concatenated
   weight: the same bytes, the same per-column arithmetic, the same results.
3. ``Split(axis=-1, split=[N_1, ..., N_n])`` gives each member's output back, under the
   member's output value (every consumer is rewired).

        x ----+--> MatMulNBits(q) --> q              x --> MatMulNBits(qkv) --> Split --> q
              +--> MatMulNBits(k) --> k      ==>                                    +--> k
              +--> MatMulNBits(v) --> v                                             +--> v

The weights are concatenated lazily (when the model is saved), so fusing before the save
costs no extra memory. A graph with no such group is left alone (modified False).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from .base import ReportedPassResult

_SAME = ("K", "bits", "block_size", "accuracy_level")


def _attrs(node: ir.Node) -> tuple:
    return tuple(node.attributes[a].value if a in node.attributes else None for a in _SAME)


def _fusable(node: ir.Node) -> bool:
    if node.op_type != "MatMulNBits" or node.domain != "com.microsoft" or len(node.inputs) != 3:
        return False
    b, scales = node.inputs[1], node.inputs[2]
    return b is not None and scales is not None and b.const_value is not None and scales.const_value is not None


def _concat(tensors: list[ir.TensorProtocol], name: str) -> ir.LazyTensor:
    shape = [sum(t.shape[0] for t in tensors), *list(tensors[0].shape)[1:]]
    return ir.LazyTensor(
        lambda: ir.tensor(np.concatenate([t.numpy() for t in tensors], axis=0), name=name),
        dtype=tensors[0].dtype, shape=ir.Shape(shape), name=name,
    )


class FuseSiblingMatMulNBitsPass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ReportedPassResult:
        graph = model.graph
        groups: dict[tuple, list[ir.Node]] = {}
        for node in graph:
            if _fusable(node):
                groups.setdefault((id(node.inputs[0]), _attrs(node)), []).append(node)
        fused = replaced = 0
        for members in groups.values():
            if len(members) < 2:
                continue
            self._fuse(graph, members)
            fused += 1
            replaced += len(members)
        return ReportedPassResult(model, fused > 0, stats={"fused_groups": fused, "matmuls_replaced": replaced})

    @staticmethod
    def _fuse(graph: ir.Graph, members: list[ir.Node]) -> None:
        first = members[0]
        widths = [int(m.attributes["N"].value) for m in members]
        # "/model/layers.0/attn/q_proj/MatMulNBits", ".../k_proj/..." -> "/model/layers.0/attn/q_proj_k_proj"
        paths = [m.name.split("/")[:-1] for m in members]
        common = next((i for i, seg in enumerate(zip(*paths)) if len(set(seg)) > 1), min(map(len, paths)))
        base = "/".join(paths[0][:common]) + "/" + "_".join("_".join(p[common:]) for p in paths)
        inits = []
        for idx, part in ((1, "qweight"), (2, "scales")):
            tensor = _concat([m.inputs[idx].const_value for m in members], f"{base}.{part}")
            v = ir.Value(name=f"{base}.{part}", type=ir.TensorType(tensor.dtype), shape=ir.Shape(tensor.shape), const_value=tensor)
            graph.register_initializer(v)
            inits.append(v)
        attrs = {a.name: a for a in first.attributes.values()}
        attrs["N"] = ir.AttrInt64("N", sum(widths))
        matmul = ir.Node("com.microsoft", "MatMulNBits", [first.inputs[0], *inits], attributes=list(attrs.values()),
                         name=f"{base}/MatMulNBits")
        matmul.outputs[0].name = f"{base}/output_0"
        if first.outputs[0].dtype is not None:
            matmul.outputs[0].dtype = first.outputs[0].dtype
        widths_value = ir.Value(name=f"{base}/split_sizes", const_value=ir.tensor(np.array(widths, np.int64)))
        widths_value.type, widths_value.shape = ir.TensorType(ir.DataType.INT64), ir.Shape([len(widths)])
        graph.register_initializer(widths_value)
        split = ir.Node("", "Split", [matmul.outputs[0], widths_value], attributes=[ir.AttrInt64("axis", -1)],
                        num_outputs=len(members), name=f"{base}/Split")
        graph.insert_before(first, [matmul, split])
        for member, out in zip(members, split.outputs):
            old = member.outputs[0]
            name, old.name = old.name, f"{old.name}/unfused"
            out.name = name  # consumers keep reading a value of the same name
            if old.dtype is not None:
                out.dtype, out.shape = old.dtype, old.shape
            ir.convenience.replace_all_uses_with(old, out)
            if old in graph.outputs:
                graph.outputs[list(graph.outputs).index(old)] = out
        weights = [v for m in members for v in m.inputs[1:]]
        for member in members:
            graph.remove(member, safe=True)
        for v in weights:  # the members' own weights: nothing reads them any more
            if not v.uses() and graph.initializers.get(v.name) is v:
                graph.initializers.pop(v.name)
