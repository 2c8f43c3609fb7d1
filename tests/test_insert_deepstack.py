"""InsertDeepStackPass on its own: a matching decoder, an already-converted one, and a graph
without the layer structure."""

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from qwen3vl_compile.errors import PassError
from qwen3vl_compile.export.text_decoder import build_decoder_model
from qwen3vl_compile.passes.base import run_passes
from qwen3vl_compile.passes.insert_deepstack import InsertDeepStackPass


def test_inserts_input_and_one_add_per_level(tiny_checkpoint):
    model, spec = build_decoder_model(tiny_checkpoint, precision="fp32", context_length=128)
    assert "deepstack_embeds" not in [v.name for v in model.graph.inputs]
    model, reports = run_passes(model, [InsertDeepStackPass(3, spec.hidden)])
    assert reports[0]["modified"] and reports[0]["stats"]["adds_inserted"] == 3
    deep = next(v for v in model.graph.inputs if v.name == "deepstack_embeds")
    assert [d if isinstance(d, int) else str(d) for d in deep.shape] == [3, "batch_size", "sequence_length", 128]
    adds = [n for n in model.graph if n.name.startswith("/model/deepstack/") and n.op_type == "Add"]
    assert len(adds) == 3
    # Each Add feeds the residual add of the next layer (k + 1), in order.
    consumers = [next(iter(a.outputs[0].uses())).node.name for a in adds]
    assert consumers == [f"/model/layers.{k + 1}/input_layernorm/SkipLayerNorm" for k in range(3)]
    # Running it again changes nothing.
    model, reports = run_passes(model, [InsertDeepStackPass(3, spec.hidden)])
    assert not reports[0]["modified"]


def test_refuses_graph_without_decoder_layers():
    text = """
    <ir_version: 9, opset_import: ["" : 18]>
    g (float[1, 2, 4] x) => (float[1, 2, 4] y) { y = Relu (x) }
    """
    model = ir.serde.deserialize_model(onnx.parser.parse_model(text))
    with pytest.raises(PassError, match="fewer than 3 DeepStack levels"):
        run_passes(model, [InsertDeepStackPass(3, 4)])


def test_refuses_when_residual_add_is_not_found(tiny_checkpoint):
    model, spec = build_decoder_model(tiny_checkpoint, precision="fp32", context_length=128)
    for n in model.graph:
        if n.name == "/model/layers.2/input_layernorm/SkipLayerNorm":
            n.name = "renamed"
    with pytest.raises(PassError, match="after decoder layer 1"):
        run_passes(model, [InsertDeepStackPass(3, spec.hidden)])
