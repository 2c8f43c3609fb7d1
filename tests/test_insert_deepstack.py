"""InsertDeepStackPass on its own: our decoder (structure, and ONNX Runtime before/after),
an already-converted graph, graphs it must refuse, an fp16 residual stream, and a decoder
made by onnxruntime-genai's builder (optional: needs the package)."""

import subprocess
import sys

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from qwen3vl_compile.errors import PassError
from qwen3vl_compile.export.text_decoder import build_decoder_model, save_streaming
from qwen3vl_compile.passes.base import run_passes
from qwen3vl_compile.passes.insert_deepstack import InsertDeepStackPass

H, KV_HEADS, HEAD_DIM, LAYERS = 128, 2, 32, 4


def _decoder(ck):
    model, spec = build_decoder_model(ck, precision="fp32", context_length=128)
    return model, spec


def _run(path, embeds, positions, deepstack=None):
    import onnxruntime as ort

    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    n = embeds.shape[1]
    feeds = {"inputs_embeds": embeds, "attention_mask": np.ones((1, n), np.int64), "position_ids": positions}
    for i in range(LAYERS):
        for kv in ("key", "value"):
            feeds[f"past_key_values.{i}.{kv}"] = np.zeros((1, KV_HEADS, 0, HEAD_DIM), np.float32)
    if deepstack is not None:
        feeds["deepstack_embeds"] = deepstack
    return s.run(["logits"], feeds)[0]


def test_inserts_input_and_one_add_per_level(tiny_checkpoint):
    model, spec = _decoder(tiny_checkpoint)
    assert "deepstack_embeds" not in [v.name for v in model.graph.inputs]
    model, reports = run_passes(model, [InsertDeepStackPass(3, spec.hidden)])
    assert reports[0].modified and reports[0].stats == {"levels": 3, "adds_inserted": 3, "layers": 4}
    deep = next(v for v in model.graph.inputs if v.name == "deepstack_embeds")
    assert [d if isinstance(d, int) else str(d) for d in deep.shape] == [3, "batch_size", "sequence_length", 128]
    adds = [n for n in model.graph if n.name.startswith("/model/deepstack/") and n.op_type == "Add"]
    assert len(adds) == 3
    # Each Add feeds the node that closes layer k (the residual add of layer k + 1), in order,
    # and adds level k of the input.
    consumers = [next(iter(a.outputs[0].uses())).node.name for a in adds]
    assert consumers == [f"/model/layers.{k + 1}/input_layernorm/SkipLayerNorm" for k in range(3)]
    levels = [int(a.inputs[1].producer().inputs[1].const_value.numpy()) for a in adds]
    assert levels == [0, 1, 2]
    # Running it again changes nothing.
    model, reports = run_passes(model, [InsertDeepStackPass(3)])
    assert not reports[0].modified and reports[0].stats["adds_inserted"] == 0


def test_outputs_unchanged_with_zero_deepstack_and_causal_otherwise(tiny_checkpoint, tmp_path):
    """ONNX Runtime before and after: zeros reproduce the original graph exactly; features at
    position j leave every earlier position's logits alone (the adds sit in the causal
    residual stream) and change position j's."""
    model, spec = _decoder(tiny_checkpoint)
    save_streaming(model, tmp_path / "before.onnx")
    model, _ = _decoder(tiny_checkpoint)
    model, _ = run_passes(model, [InsertDeepStackPass(3, spec.hidden)])
    save_streaming(model, tmp_path / "after.onnx")
    rng = np.random.default_rng(0)
    n, j = 10, 6
    embeds = rng.standard_normal((1, n, H)).astype(np.float32)
    positions = np.broadcast_to(np.arange(n), (3, 1, n)).copy()
    before = _run(tmp_path / "before.onnx", embeds, positions)
    zeros = _run(tmp_path / "after.onnx", embeds, positions, np.zeros((3, 1, n, H), np.float32))
    assert np.array_equal(before, zeros)
    deep = np.zeros((3, 1, n, H), np.float32)
    deep[:, :, j] = rng.standard_normal((3, 1, H))
    with_features = _run(tmp_path / "after.onnx", embeds, positions, deep)
    assert np.array_equal(with_features[:, :j], before[:, :j])
    assert np.abs(with_features[:, j] - before[:, j]).max() > 1e-2


def test_refuses_graph_without_decoder_layers():
    text = """
    <ir_version: 9, opset_import: ["" : 18]>
    g (float[1, 2, 4] x) => (float[1, 2, 4] y) { y = Relu (x) }
    """
    model = ir.serde.deserialize_model(onnx.parser.parse_model(text))
    with pytest.raises(PassError, match="fewer than 3 DeepStack levels"):
        run_passes(model, [InsertDeepStackPass(3, 4)])


def test_refuses_when_residual_add_is_not_found(tiny_checkpoint):
    model, spec = _decoder(tiny_checkpoint)
    for n in model.graph:
        if n.name == "/model/layers.2/input_layernorm/SkipLayerNorm":
            n.name = "renamed"
    with pytest.raises(PassError, match="after decoder layer 1"):
        run_passes(model, [InsertDeepStackPass(3, spec.hidden)])
    assert "deepstack_embeds" not in [v.name for v in model.graph.inputs]  # refused before touching it


def _skeleton(dtype: ir.DataType, layers: int = 2) -> ir.Model:
    """The names and ops the pass looks at, nothing else: per layer a GroupQueryAttention
    stand-in and the SkipSimplifiedLayerNormalization closing it (final norm last)."""
    x = ir.Value(name="inputs_embeds", type=ir.TensorType(dtype), shape=ir.Shape(["batch_size", "sequence_length", 8]))
    gamma = ir.Value(name="gamma", type=ir.TensorType(dtype), shape=ir.Shape([8]),
                     const_value=ir.tensor(np.ones(8, dtype.numpy())))
    nodes, residual, h = [], x, x
    for i in range(layers):
        gqa = ir.node("GroupQueryAttention", [h, h, h], domain="com.microsoft", name=f"/model/layers.{i}/attn/GroupQueryAttention",
                      num_outputs=3)
        name = f"/model/layers.{i + 1}/input_layernorm/SkipLayerNorm" if i + 1 < layers else "/model/norm/SkipLayerNorm"
        skip = ir.node("SkipSimplifiedLayerNormalization", [gqa.outputs[0], residual, gamma], domain="com.microsoft", name=name,
                       num_outputs=4)
        gqa.outputs[0].dtype = dtype
        nodes += [gqa, skip]
        h, residual = skip.outputs[0], skip.outputs[3]
    h.name, h.dtype, h.shape = "hidden", dtype, ir.Shape(x.shape)
    graph = ir.Graph([x], [h], nodes=nodes, initializers=[gamma], opset_imports={"": 18, "com.microsoft": 1}, name="skeleton")
    return ir.Model(graph, ir_version=10)


def test_fp16_residual_gets_a_cast_and_last_layer_uses_final_norm():
    model, reports = run_passes(_skeleton(ir.DataType.FLOAT16), [InsertDeepStackPass(2)])
    assert reports[0].stats == {"levels": 2, "adds_inserted": 2, "layers": 2}
    casts = [n for n in model.graph if n.op_type == "Cast"]
    assert [c.attributes["to"].value for c in casts] == [ir.DataType.FLOAT16] * 2
    deep = model.graph.inputs[-1]
    assert deep.name == "deepstack_embeds" and deep.dtype == ir.DataType.FLOAT and deep.shape[-1] == 8  # H from inputs_embeds
    final = next(n for n in model.graph if n.name == "/model/norm/SkipLayerNorm")
    assert final.inputs[0].producer().name == "/model/deepstack/1/Add"
    onnx.checker.check_model(ir.serde.serialize_model(model))


def test_hidden_size_must_be_known():
    model = _skeleton(ir.DataType.FLOAT)
    model.graph.inputs[0].shape = ir.Shape(["batch_size", "sequence_length", "hidden"])
    with pytest.raises(PassError, match="hidden size not given"):
        run_passes(model, [InsertDeepStackPass(2)])


@pytest.mark.slow  # runs onnxruntime-genai's model builder
def test_decoder_from_onnxruntime_genai_builder(tiny_checkpoint, tmp_path):
    """onnxruntime-genai's Qwen3-VL decoder has no DeepStack; after the pass it matches
    Hugging Face on an image prompt (its residual add names the final norm differently and
    takes the residual as ``input``, the MLP output as ``skip``)."""
    pytest.importorskip("onnxruntime_genai")
    import torch

    out = tmp_path / "genai"
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", str(tiny_checkpoint.path), "-o", str(out),
           "-p", "fp32", "-e", "cpu", "-c", str(tmp_path / "cache"), "--extra_options", "exclude_embeds=true"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.skip(f"onnxruntime-genai builder failed on this install: {proc.stderr[-300:]}")
    model = ir.load(out / "model.onnx")
    model, reports = run_passes(model, [InsertDeepStackPass(3)])
    assert reports[0].stats == {"levels": 3, "adds_inserted": 3, "layers": 4}
    adds = [n for n in model.graph if n.name.startswith("/model/deepstack/") and n.op_type == "Add"]
    consumers = [next(iter(a.outputs[0].uses())).node.name for a in adds]
    assert consumers == [f"/model/layers.{k + 1}/input_layernorm/SkipLayerNorm" for k in range(3)]
    ir.save(model, out / "with_deepstack.onnx", external_data="with_deepstack.onnx.data")

    hf = tiny_checkpoint.load_full_model()
    g = torch.Generator().manual_seed(0)
    ids = torch.cat([torch.randint(0, 3000, (4,), generator=g), torch.tensor([151652]), torch.full((16,), 151655),
                     torch.tensor([151653]), torch.randint(0, 3000, (3,), generator=g)])[None]
    mask = ids == 151655
    with torch.no_grad():
        embeds = hf.model.language_model.embed_tokens(ids).clone()
        embeds[mask] = torch.randn(16, H, generator=g)
        deep = [torch.randn(16, H, generator=g) for _ in range(3)]
        pos, _ = hf.model.get_rope_index(ids, mm_token_type_ids=mask.int(), image_grid_thw=torch.tensor([[1, 8, 8]]))
        hidden = hf.model.language_model(inputs_embeds=embeds, position_ids=pos, visual_pos_masks=mask,
                                          deepstack_visual_embeds=deep).last_hidden_state
        ref = hf.lm_head(hidden).numpy()
    d = np.zeros((3, *embeds.shape), np.float32)
    for k in range(3):
        d[k][mask.numpy()] = deep[k].numpy()
    got = _run(out / "with_deepstack.onnx", embeds.numpy(), pos.numpy(), d)
    assert np.abs(got - ref).max() / np.abs(ref).max() <= 1e-4
