"""InsertDeepStackPass: give a Qwen3-VL text decoder its DeepStack input.

Qwen3-VL adds multi-level vision features to the hidden states after the first K decoder
layers (Hugging Face: ``hidden[visual_pos_mask] += deepstack[k]`` after layer k). Public
decoders built without it silently lose accuracy. Rules:

1. Add the graph input ``deepstack_embeds [K, batch_size, sequence_length, hidden]``
   (zero on text tokens; the embedding graph produces it aligned to the sequence).
2. For each level k < K, find the node that adds layer k's MLP output to the residual
   stream: the ``SkipSimplifiedLayerNormalization`` named
   ``/model/layers.{k+1}/input_layernorm/SkipLayerNorm`` (``/model/norm/SkipLayerNorm`` after
   the last layer), and add ``deepstack_embeds[k]`` to its first input. Since that node
   computes ``input + skip``, the residual after layer k becomes
   ``mlp_out + deepstack[k] + residual``: Hugging Face's sum, in another order.

        mlp_out(k)   residual              mlp_out(k)  Gather(deepstack_embeds, k)
             \\         /                        \\         /
     SkipSimplifiedLayerNorm(k+1)   ==>            Add       residual
                                                      \\       /
                                            SkipSimplifiedLayerNorm(k+1)

A graph that already has ``deepstack_embeds`` is left alone (modified False). A graph where
layer k's residual add cannot be found is refused with a typed error.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qwen3vl_compile.errors import PassError

from .base import ReportedPassResult

INPUT_NAME = "deepstack_embeds"
SKIP_OP = "SkipSimplifiedLayerNormalization"


def _residual_add_node(graph: ir.Graph, k: int, num_layers: int) -> ir.Node | None:
    wanted = "/model/norm/SkipLayerNorm" if k + 1 == num_layers else f"/model/layers.{k + 1}/input_layernorm/SkipLayerNorm"
    for node in graph:
        if node.name == wanted and node.op_type == SKIP_OP:
            return node
    return None


def _count_layers(graph: ir.Graph) -> int:
    return sum(1 for n in graph if n.op_type == "GroupQueryAttention")


class InsertDeepStackPass(ir.passes.InPlacePass):
    def __init__(self, levels: int, hidden_size: int):
        if levels < 1:
            raise ValueError("levels must be >= 1")
        self.levels = levels
        self.hidden_size = hidden_size

    def call(self, model: ir.Model) -> ReportedPassResult:
        graph = model.graph
        if any(v.name == INPUT_NAME for v in graph.inputs):
            return ReportedPassResult(model, False, stats={"levels": self.levels, "adds_inserted": 0, "already_present": True})
        num_layers = _count_layers(graph)
        if num_layers < self.levels:
            raise PassError(f"decoder has {num_layers} attention layers, fewer than {self.levels} DeepStack levels")
        targets = []
        for k in range(self.levels):
            node = _residual_add_node(graph, k, num_layers)
            if node is None:
                raise PassError(f"cannot find the residual add after decoder layer {k} (a {SKIP_OP} named for layer {k + 1})")
            targets.append(node)
        deep = ir.Value(
            name=INPUT_NAME,
            type=ir.TensorType(ir.DataType.FLOAT),
            shape=ir.Shape([self.levels, "batch_size", "sequence_length", self.hidden_size]),
        )
        graph.inputs.append(deep)
        for k, node in enumerate(targets):
            idx = ir.Value(name=f"/model/deepstack/level_{k}", const_value=ir.tensor(np.array(k, np.int64)))
            idx.type, idx.shape = ir.TensorType(ir.DataType.INT64), ir.Shape([])
            graph.register_initializer(idx)
            gather = ir.node("Gather", [deep, idx], attributes={"axis": 0}, name=f"/model/deepstack/{k}/Gather")
            gather.outputs[0].name = f"/model/deepstack/{k}/features"
            add = ir.node("Add", [node.inputs[0], gather.outputs[0]], name=f"/model/deepstack/{k}/Add")
            add.outputs[0].name = f"/model/deepstack/{k}/hidden"
            graph.insert_before(node, [gather, add])
            node.replace_input_with(0, add.outputs[0])
        return ReportedPassResult(model, True, stats={"levels": self.levels, "adds_inserted": self.levels, "layers": num_layers})
