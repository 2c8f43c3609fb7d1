"""export.moe.moe_mlp against Hugging Face's Qwen3VLMoeTextSparseMoeBlock.

A tiny random block (std 0.2 weights, fp32) is written to a safetensors "checkpoint" under the
real key names, in each of the three expert layouts (fused as transformers 5 saves it, fused as
the Hub's files store it, per expert); a one-node graph around moe_mlp runs on ONNX Runtime CPU
and is compared with the block's output: fp32 (MoE op) to 1e-5 relative, int4 (QMoE) to 1e-4
against HF with quantized-then-dequantized experts. Negative checks: a wrong top_k or a flipped
norm_topk_prob must move the output far beyond the tolerance (QMoE's own
normalize_routing_weights=0 is a no-op, which the flipped check would catch)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import save_file

from qwen3vl_compile.model.checkpoint import Checkpoint
from qwen3vl_compile.export.moe import is_moe_layer, moe_kwargs, moe_mlp
from qwen3vl_compile.export.quantize import dequantize_int4, quantize_int4
from qwen3vl_compile.export.text_decoder import _Builder, _Weights

LAYER = 3  # not 0, so a wrong layer prefix cannot go unnoticed
# (hidden, moe_intermediate, block_size): H != 2I and H != I, so the two fused layouts differ.
SHAPES = {"h64": (64, 48, 16), "h128": (128, 32, 32)}
E = 8
# (shape, top_k, norm_topk_prob, checkpoint layout): each layout with both shapes, top-2 and
# top-3, normalised and not.
CASES = [
    ("h64", 2, True, "memory"),
    ("h64", 3, False, "hub"),
    ("h64", 3, True, "per_expert"),
    ("h128", 3, True, "hub"),
    ("h128", 2, False, "memory"),
    ("h128", 2, False, "per_expert"),
]
INPUTS = [(1, 7), (1, 1), (2, 5)]  # (batch, sequence): several tokens, one token, a batch


def rel_err(a, ref) -> float:
    return float(np.abs(a - ref).max() / np.abs(ref).max())


def hf_block(H, I, k, seed=0):
    from transformers.models.qwen3_vl_moe.configuration_qwen3_vl_moe import Qwen3VLMoeTextConfig
    from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeTextSparseMoeBlock

    cfg = Qwen3VLMoeTextConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=k, hidden_act="silu")
    cfg._experts_implementation = "eager"  # HF's loop over experts (a standalone block falls back to it, with a warning)
    block = Qwen3VLMoeTextSparseMoeBlock(cfg).float().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return block


def hf_forward(block, x: np.ndarray, norm: bool) -> np.ndarray:
    """HF's output. Qwen3VLMoe's router always renormalises the top-k; for norm=False the
    block's own router logits and experts are used with the unnormalised top-k softmax
    (the Qwen3-MoE text router with norm_topk_prob=False)."""
    with torch.no_grad():
        xt = torch.from_numpy(x)
        if norm:
            return block(xt).numpy()
        h = xt.reshape(-1, x.shape[-1])
        logits, _, idx = block.gate(h)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float)
        w, idx2 = torch.topk(probs, block.gate.top_k, dim=-1)
        assert torch.equal(idx, idx2)
        return block.experts(h, idx, w).reshape(x.shape).numpy()


def write_checkpoint(block, path, layout: str, layers=(LAYER,)):
    """The block's weights under the real key names (one copy per layer in ``layers``; a
    list of blocks gives each layer its own). layout: "memory" ([E, 2I, H] and [E, H, I],
    what transformers 5 saves), "hub" ([E, H, 2I] and [E, I, H], the Hub's Qwen3-VL-MoE
    files) or "per_expert" (experts.{e}.gate_proj/up_proj/down_proj.weight)."""
    blocks = block if isinstance(block, list) else [block] * len(layers)
    # A neighbouring dense layer, as in a real file (must be left alone).
    state = {"model.language_model.layers.0.mlp.gate_proj.weight": torch.zeros(4, 4)}
    for layer, blk in zip(layers, blocks):
        pre = f"model.language_model.layers.{layer}.mlp."
        gu = blk.experts.gate_up_proj.detach().clone()
        dn = blk.experts.down_proj.detach().clone()
        I = dn.shape[2]
        state[pre + "gate.weight"] = blk.gate.weight.detach().clone()
        if layout == "memory":
            state |= {pre + "experts.gate_up_proj": gu, pre + "experts.down_proj": dn}
        elif layout == "hub":
            state |= {pre + "experts.gate_up_proj": gu.transpose(1, 2).contiguous(), pre + "experts.down_proj": dn.transpose(1, 2).contiguous()}
        else:
            for e in range(gu.shape[0]):
                state[f"{pre}experts.{e}.gate_proj.weight"] = gu[e, :I].contiguous()
                state[f"{pre}experts.{e}.up_proj.weight"] = gu[e, I:].contiguous()
                state[f"{pre}experts.{e}.down_proj.weight"] = dn[e].contiguous()
    path.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path / "model.safetensors"))
    return Checkpoint(path=path, config={}, preprocessor={})  # weights only: all W needs


def build_session(ck, tmp_path, *, H, I, k, norm, precision, bs, acc=0, layers=(LAYER,)):
    W = _Weights(ck, precision, bs)
    b = _Builder()
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["batch", "seq", H]))
    y = x
    for layer in layers:
        y = moe_mlp(
            b, y, W, f"layers.{layer}.", f"/model/layers.{layer}/mlp",
            num_experts=E, top_k=k, norm_topk_prob=norm, hidden=H, moe_intermediate=I,
            precision=precision, block_size=bs, accuracy_level=acc,
        )  # fmt: skip
    y.name = "y"
    # Weights stay lazy until the save (nothing read while building).
    weights = [v for v in b.initializers if not v.name.startswith("/model/constants/")]
    assert weights and all(isinstance(v.const_value, ir.LazyTensor) for v in weights)
    graph = ir.Graph(inputs=[x], outputs=[y], nodes=b.nodes, initializers=b.initializers, opset_imports={"": 23, "com.microsoft": 1}, name="moe")
    path = tmp_path / f"moe_{precision}_k{k}_n{int(norm)}_a{acc}_{len(layers)}.onnx"
    ir.save(ir.Model(graph, ir_version=10, producer_name="test"), path, external_data=path.name + ".data")
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def inputs(H, seed=1):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((bsz, s, H)).astype(np.float32) for bsz, s in INPUTS]


def run(sess, x):
    return sess.run(None, {"x": x})[0]


def dequantized(block, bs):
    """A copy of the block whose experts hold int4-quantized-then-dequantized weights
    (quantize_int4 per expert, as MatMulNBits would see each expert's Linear)."""
    import copy

    q = copy.deepcopy(block)
    with torch.no_grad():
        for p in (q.experts.gate_up_proj, q.experts.down_proj):
            for e in range(p.shape[0]):
                w = p[e].numpy()  # [N, K]
                packed, scales = quantize_int4(np.ascontiguousarray(w.T), bs)
                p[e] = torch.from_numpy(dequantize_int4(packed, scales, w.shape[1]).T.copy())
    return q


@pytest.mark.parametrize("shape,k,norm,layout", CASES)
def test_fp32_matches_hf(tmp_path, shape, k, norm, layout):
    H, I, bs = SHAPES[shape]
    block = hf_block(H, I, k)
    ck = write_checkpoint(block, tmp_path / "ck", layout)
    sess = build_session(ck, tmp_path, H=H, I=I, k=k, norm=norm, precision="fp32", bs=bs)
    for x in inputs(H):
        err = rel_err(run(sess, x), hf_forward(block, x, norm))
        print(f"fp32 {layout} {shape} k={k} norm={norm} x{list(x.shape)}: {err:.1e}")
        assert err <= 1e-5, (x.shape, err)


@pytest.mark.parametrize("shape,k,norm", [("h64", 2, True), ("h128", 3, False)])
def test_fp16_matches_hf_with_fp16_weights(tmp_path, shape, k, norm):
    H, I, bs = SHAPES[shape]
    block = hf_block(H, I, k)
    ck = write_checkpoint(block, tmp_path / "ck", "hub")
    sess = build_session(ck, tmp_path, H=H, I=I, k=k, norm=norm, precision="fp16", bs=bs)
    with torch.no_grad():  # the reference with the weights the graph stores
        for p in block.parameters():
            p.copy_(p.half().float())
    for x in inputs(H):
        err = rel_err(run(sess, x), hf_forward(block, x, norm))
        print(f"fp16 {shape} k={k} norm={norm} x{list(x.shape)}: {err:.1e}")
        assert err <= 1e-5, (x.shape, err)


@pytest.mark.parametrize("shape,k,norm,layout", CASES)
def test_int4_matches_hf_with_dequantized_experts(tmp_path, shape, k, norm, layout):
    H, I, bs = SHAPES[shape]
    block = hf_block(H, I, k)
    ck = write_checkpoint(block, tmp_path / "ck", layout)
    ref_block = dequantized(block, bs)
    sess0 = build_session(ck, tmp_path, H=H, I=I, k=k, norm=norm, precision="int4", bs=bs, acc=0)
    sess4 = build_session(ck, tmp_path, H=H, I=I, k=k, norm=norm, precision="int4", bs=bs, acc=4)
    for x in inputs(H):
        ref = hf_forward(ref_block, x, norm)
        err0, err4 = rel_err(run(sess0, x), ref), rel_err(run(sess4, x), ref)
        err_fp = rel_err(run(sess0, x), hf_forward(block, x, norm))
        print(f"int4 {layout} {shape} k={k} norm={norm} x{list(x.shape)}: vs dequantized HF acc0 {err0:.1e} acc4 {err4:.1e}; vs fp32 HF {err_fp:.1e}")
        assert err0 <= 1e-4, (x.shape, err0)
        assert err4 <= 5e-2, (x.shape, err4)  # int8 activations: reported, sanity bound only


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_wrong_routing_is_detected(tmp_path, precision):
    """top_k + 1 or a flipped norm_topk_prob moves the output >= 100x past the tolerance."""
    H, I, bs = SHAPES["h64"]
    k = 2
    block = hf_block(H, I, k)
    ck = write_checkpoint(block, tmp_path / "ck", "hub")
    ref_block = dequantized(block, bs) if precision == "int4" else block
    tol = 1e-4 if precision == "int4" else 1e-5
    for norm in (True, False):
        right = build_session(ck, tmp_path, H=H, I=I, k=k, norm=norm, precision=precision, bs=bs)
        flipped = build_session(ck, tmp_path, H=H, I=I, k=k, norm=not norm, precision=precision, bs=bs)
        more = build_session(ck, tmp_path, H=H, I=I, k=k + 1, norm=norm, precision=precision, bs=bs)
        for x in inputs(H):
            ref = hf_forward(ref_block, x, norm)
            e_right, e_flip, e_more = (rel_err(run(s, x), ref) for s in (right, flipped, more))
            print(f"{precision} norm={norm} x{list(x.shape)}: right {e_right:.1e}, norm flipped {e_flip:.1e}, top_k+1 {e_more:.1e}")
            assert e_right <= tol
            assert e_flip > 100 * tol, ("norm flipped", norm, x.shape)
            assert e_more > 100 * tol, ("top_k+1", norm, x.shape)


def test_two_layers_in_one_graph(tmp_path):
    """Two MoE layers chained in one graph: distinct initializer names, each layer its weights."""
    H, I, bs = SHAPES["h64"]
    b1, b2 = hf_block(H, I, 2, seed=0), hf_block(H, I, 2, seed=5)
    ck = write_checkpoint([b1, b2], tmp_path / "ck", "hub", layers=(LAYER, LAYER + 1))
    sess = build_session(ck, tmp_path, H=H, I=I, k=2, norm=True, precision="fp32", bs=bs, layers=(LAYER, LAYER + 1))
    for x in inputs(H):
        ref = hf_forward(b2, hf_forward(b1, x, True), True)
        assert rel_err(run(sess, x), ref) <= 1e-5


def test_config_helpers():
    t = dict(model_type="qwen3_vl_moe_text", num_experts=128, num_experts_per_tok=8, hidden_size=2048, moe_intermediate_size=768,
             decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=False)  # fmt: skip
    # Qwen3VLMoe's router renormalises whatever the config says.
    assert moe_kwargs(t) == dict(num_experts=128, top_k=8, norm_topk_prob=True, hidden=2048, moe_intermediate=768)
    assert moe_kwargs(t | {"model_type": "qwen3_moe"})["norm_topk_prob"] is False
    assert all(is_moe_layer(t, i) for i in range(4))
    assert [is_moe_layer(t | {"decoder_sparse_step": 2, "mlp_only_layers": [3]}, i) for i in range(6)] == [False, True, False, False, False, True]


def test_int4_bytes_are_matmulnbits_bytes(tmp_path):
    """QMoE's expert tensors are each expert's MatMulNBits quantization, stacked; FC1 rows are
    gate/up interleaved (g0, u0, g1, u1, ...)."""
    import onnx
    from onnx import numpy_helper

    H, I, bs = SHAPES["h128"]
    block = hf_block(H, I, 2)
    ck = write_checkpoint(block, tmp_path / "ck", "hub")
    build_session(ck, tmp_path, H=H, I=I, k=2, norm=True, precision="int4", bs=bs)
    m = onnx.load(str(tmp_path / "moe_int4_k2_n1_a0_1.onnx"))
    t = {i.name.rsplit(".", 2)[-2] + "." + i.name.rsplit(".", 1)[-1]: numpy_helper.to_array(i) for i in m.graph.initializer if "experts" in i.name}
    gu, dn = block.experts.gate_up_proj.detach().numpy(), block.experts.down_proj.detach().numpy()
    for e in (0, E - 1):
        inter = np.stack([gu[e, :I], gu[e, I:]], axis=1).reshape(2 * I, H)
        for w, name in ((inter, "gate_up_proj"), (dn[e], "down_proj")):
            q, s = quantize_int4(np.ascontiguousarray(w.T), bs)
            assert np.array_equal(t[f"{name}.qweight"][e], q.reshape(q.shape[0], -1))
            assert np.array_equal(t[f"{name}.scales"][e], s)


def test_refuses_what_qmoe_cannot_do(tmp_path):
    from qwen3vl_compile.errors import ExportError

    H, I, bs = SHAPES["h64"]  # I = 48
    ck = write_checkpoint(hf_block(H, I, 2), tmp_path / "ck", "memory")
    with pytest.raises(ExportError, match="multiples of block_size"):
        build_session(ck, tmp_path, H=H, I=I, k=2, norm=True, precision="int4", bs=32)
    with pytest.raises(ExportError, match="expected"):  # checkpoint and arguments disagree
        build_session(ck, tmp_path, H=H, I=I + 16, k=2, norm=True, precision="fp32", bs=bs)
    with pytest.raises(ExportError, match="top_k"):
        build_session(ck, tmp_path, H=H, I=I, k=E + 1, norm=True, precision="fp32", bs=bs)
