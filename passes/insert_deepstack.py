"""InsertDeepStackPass: give a Qwen3-VL text decoder its DeepStack input.

Qwen3-VL adds multi-level vision features to the hidden states after the first K decoder
layers (Hugging Face ``Qwen3VLTextModel``: ``hidden[visual_pos_mask] += deepstack[k]``
right after layer k). Decoders built without it (onnxruntime-genai's, for one) silently
lose accuracy on images. Rules:

1. Add the graph input ``deepstack_embeds [K, batch_size, sequence_length, hidden]``
   (zero on text tokens; the embedding graph produces it aligned to the sequence, so the
   graph needs no mask).
2. For each level k < K, find the node that closes layer k: the
   ``SkipSimplifiedLayerNormalization`` that adds layer k's MLP output to the residual
   stream and normalises the sum for layer k + 1. Its name, in decoders from our builder
   (``qwen3vl_compile.export.text_decoder``) and from onnxruntime-genai's builder alike, is
   ``/model/layers.{k+1}/input_layernorm/SkipLayerNorm``; after the last layer it is
   ``/model/norm/SkipLayerNorm`` (ours) or ``/model/layers.{L}/final_norm_layernorm/SkipLayerNorm``
   (onnxruntime-genai).
3. Add ``deepstack_embeds[k]`` to that node's first input (cast to its type if that is not
   float32). The node computes ``input + skip`` and passes the sum on as output 3, the
   residual stream of layer k + 1; so the residual after layer k becomes
   ``mlp_out + deepstack[k] + residual``: Hugging Face's sum, in another order. (Our builder
   puts the MLP output in ``input`` and the residual in ``skip``; onnxruntime-genai the other
   way round; the sum is the same.)

        x_k   residual_k                x_k   Gather(deepstack_embeds, k)
          \\     /                          \\     /
       SkipSimplifiedLayerNorm   ==>          Add     residual_k
         /            \\ (out 3)                 \\     /
    normed x   residual_{k+1}         SkipSimplifiedLayerNorm
                                        /            \\ (out 3)
                                   normed x   residual_{k+1} (now with deepstack[k])

A graph that already has ``deepstack_embeds`` is left alone (modified False). A graph with
fewer attention layers than levels, or where the node closing layer k cannot be found, is
refused with a PassError naming the layer.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qwen3vl_compile.errors import PassError

from .base import ReportedPassResult

INPUT_NAME = "deepstack_embeds"
SKIP_OPS = ("SkipSimplifiedLayerNormalization",)
ATTENTION_OPS = ("GroupQueryAttention",)


def _closing_node_names(k: int, num_layers: int) -> tuple[str, ...]:
    """Names of the node that closes layer k, in the builders we know (rule 2)."""
    if k + 1 < num_layers:
        return (f"/model/layers.{k + 1}/input_layernorm/SkipLayerNorm",)
    return ("/model/norm/SkipLayerNorm", f"/model/layers.{num_layers}/final_norm_layernorm/SkipLayerNorm")


def _count_layers(graph: ir.Graph) -> int:
    return sum(1 for n in graph if n.op_type in ATTENTION_OPS and n.domain == "com.microsoft")


class InsertDeepStackPass(ir.passes.InPlacePass):
    """``levels``: K, the number of DeepStack levels (``len(deepstack_visual_indexes)``).
    ``hidden_size``: H; read from the ``inputs_embeds`` input when not given."""

    def __init__(self, levels: int, hidden_size: int | None = None):
        if levels < 1:
            raise ValueError("levels must be >= 1")
        self.levels = levels
        self.hidden_size = hidden_size

    def _hidden(self, graph: ir.Graph) -> int:
        if self.hidden_size is not None:
            return self.hidden_size
        embeds = next((v for v in graph.inputs if v.name == "inputs_embeds"), None)
        dim = embeds.shape[-1] if embeds is not None and embeds.shape is not None else None
        if not isinstance(dim, int):
            raise PassError("hidden size not given and the graph has no inputs_embeds input with a static last dimension")
        return dim

    def _targets(self, graph: ir.Graph, num_layers: int) -> list[ir.Node]:
        by_name = {n.name: n for n in graph if n.op_type in SKIP_OPS}
        targets = []
        for k in range(self.levels):
            names = _closing_node_names(k, num_layers)
            node = next((by_name[n] for n in names if n in by_name), None)
            if node is None:
                raise PassError(
                    f"cannot find the residual add after decoder layer {k}: no {'/'.join(SKIP_OPS)} named "
                    f"{' or '.join(names)}"
                )
            if node.inputs[0] is None or len(node.inputs) < 2:
                raise PassError(f"{node.name}: expected input and skip, got {len(node.inputs)} inputs")
            targets.append(node)
        return targets

    def call(self, model: ir.Model) -> ReportedPassResult:
        graph = model.graph
        if any(v.name == INPUT_NAME for v in graph.inputs):
            return ReportedPassResult(model, False, stats={"levels": self.levels, "adds_inserted": 0, "already_present": True})
        num_layers = _count_layers(graph)
        if num_layers < self.levels:
            raise PassError(f"decoder has {num_layers} attention layers, fewer than {self.levels} DeepStack levels")
        targets = self._targets(graph, num_layers)
        deep = ir.Value(
            name=INPUT_NAME,
            type=ir.TensorType(ir.DataType.FLOAT),
            shape=ir.Shape([self.levels, "batch_size", "sequence_length", self._hidden(graph)]),
        )
        graph.inputs.append(deep)
        for k, node in enumerate(targets):
            base = f"/model/deepstack/{k}"
            idx = ir.Value(name=f"/model/deepstack/level_{k}", const_value=ir.tensor(np.array(k, np.int64)))
            idx.type, idx.shape = ir.TensorType(ir.DataType.INT64), ir.Shape([])
            graph.register_initializer(idx)
            new_nodes = [ir.node("Gather", [deep, idx], attributes={"axis": 0}, name=f"{base}/Gather")]
            new_nodes[-1].outputs[0].name = f"{base}/features"
            target_type = node.inputs[0].dtype  # None in graphs without inferred types: float assumed
            if target_type is not None and target_type != ir.DataType.FLOAT:  # e.g. an fp16 decoder
                new_nodes.append(ir.node("Cast", [new_nodes[-1].outputs[0]], attributes={"to": target_type}, name=f"{base}/Cast"))
                new_nodes[-1].outputs[0].name = f"{base}/features_cast"
            add = ir.node("Add", [node.inputs[0], new_nodes[-1].outputs[0]], name=f"{base}/Add")
            add.outputs[0].name = f"{base}/hidden"
            if target_type is not None:
                add.outputs[0].dtype = target_type
            if node.inputs[0].shape is not None:
                add.outputs[0].shape = ir.Shape(node.inputs[0].shape)
            graph.insert_before(node, [*new_nodes, add])
            node.replace_input_with(0, add.outputs[0])
        return ReportedPassResult(model, True, stats={"levels": self.levels, "adds_inserted": self.levels, "layers": num_layers})
