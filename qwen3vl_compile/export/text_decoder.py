"""The text decoder (``decoder.onnx``), built directly as an ONNX graph with onnx-ir.

Weights are streamed from the checkpoint tensor by tensor through ``ir.LazyTensor``: nothing
is read until the model is saved, and each tensor is converted (and quantized) on its own,
so peak memory stays near one tensor plus the output buffer, whatever the model size.

Graph interface (the names onnxruntime-genai's qwen3_vl decoder uses):

- inputs  ``inputs_embeds [B, S, H]`` f32, ``attention_mask [B, T]`` i64,
          ``position_ids [3, B, S]`` i64 (interleaved MRoPE: T, H, W streams),
          ``past_key_values.{i}.key/value [B, kv_heads, P, head_dim]`` f32
          (``deepstack_embeds [K, B, S, H]`` is added by InsertDeepStackPass)
- outputs ``logits [B, S or 1, vocab]`` f32, ``present.{i}.key/value``

Per layer, with ONNX Runtime contrib ops (the op choice onnxruntime-genai makes for Qwen3-VL)::

    x -> RMSNormalization (ONNX opset 23) or SkipSimplifiedLayerNorm -> q/k/v MatMul(NBits) -> q_norm/k_norm (RMSNorm over
    head_dim) -> MRotaryEmbedding(q), MRotaryEmbedding(k) -> GroupQueryAttention (KV cache,
    past and present may share one preallocated buffer) -> o MatMul -> SkipSimplifiedLayerNorm
    (residual add + post-attention norm) -> gate/up MatMul -> SiLU(gate) * up -> down MatMul
    -> (next layer's SkipSimplifiedLayerNorm adds the residual)

``logits="last"`` applies the final norm and lm_head to the last position only (prefill
needs no other row).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import numpy as np
import onnx_ir as ir

from ..model.checkpoint import Checkpoint
from ..errors import ExportError, UsageError
from ..options import DecoderOptions
from ..model.support import is_moe_layer
from .moe import moe_kwargs, moe_mlp
from .quantize import quantize_int4

TEXT_PREFIXES = ("model.language_model.", "model.", "language_model.model.")
F32, I64, I32 = ir.DataType.FLOAT, ir.DataType.INT64, ir.DataType.INT32


@dataclasses.dataclass(frozen=True)
class DecoderSpec:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    eps: float
    rope_theta: float
    mrope_section: tuple[int, int, int]
    context_length: int
    tie_word_embeddings: bool
    deepstack_levels: int

    @classmethod
    def from_checkpoint(cls, ck: Checkpoint, context_length: int | None) -> "DecoderSpec":
        """``context_length`` None: the default, capped at the model's max_position_embeddings."""
        from ..options import DEFAULT_CONTEXT_LENGTH

        t = ck.text_config
        context_length = context_length or DEFAULT_CONTEXT_LENGTH
        rope = ck.rope
        head_dim = t.get("head_dim") or t["hidden_size"] // t["num_attention_heads"]
        return cls(
            hidden=t["hidden_size"],
            intermediate=t["intermediate_size"],
            layers=t["num_hidden_layers"],
            heads=t["num_attention_heads"],
            kv_heads=t.get("num_key_value_heads") or t["num_attention_heads"],
            head_dim=head_dim,
            vocab=t["vocab_size"],
            eps=float(t.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta", t.get("rope_theta", 5e6))),
            mrope_section=tuple(rope["mrope_section"]),
            context_length=min(context_length, t.get("max_position_embeddings", context_length)),
            tie_word_embeddings=ck.tie_word_embeddings,
            deepstack_levels=len(ck.vision_config.get("deepstack_visual_indexes", [])),
        )


def rope_cache(spec: DecoderSpec) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [context_length, head_dim/2], float32, as Hugging Face computes them (fp32)."""
    import torch

    inv_freq = 1.0 / (spec.rope_theta ** (torch.arange(0, spec.head_dim, 2, dtype=torch.int64).float() / spec.head_dim))
    freqs = torch.arange(spec.context_length, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return freqs.cos().numpy(), freqs.sin().numpy()


class _Builder:
    """Small helper: named nodes, typed values, initializers."""

    def __init__(self):
        self.nodes: list[ir.Node] = []
        self.initializers: list[ir.Value] = []
        self._consts: dict[tuple, ir.Value] = {}

    def op(self, op_type, inputs, name, *, outputs=1, domain="", **attrs) -> list[ir.Value]:
        node = ir.node(op_type, inputs, attributes=attrs, domain=domain, name=name, num_outputs=outputs)
        for i, out in enumerate(node.outputs):
            out.name = f"{name}/output_{i}"
        self.nodes.append(node)
        return list(node.outputs)

    def op1(self, *args, **kwargs) -> ir.Value:
        return self.op(*args, **kwargs)[0]

    def init(self, name: str, tensor: ir.TensorProtocol) -> ir.Value:
        v = ir.Value(name=name, type=ir.TensorType(tensor.dtype), shape=ir.Shape(tensor.shape), const_value=tensor)
        self.initializers.append(v)
        return v

    def const(self, array) -> ir.Value:
        arr = np.asarray(array)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            shape = "x".join(map(str, arr.shape)) or "scalar"
            name = f"/model/constants/{arr.dtype}/{shape}/{'_'.join(map(str, arr.reshape(-1).tolist()))[:40]}"
            self._consts[key] = self.init(name, ir.tensor(arr, name=name))
        return self._consts[key]


class _Weights:
    """Lazy weight tensors read from the checkpoint and converted one at a time."""

    def __init__(self, ck: Checkpoint, precision: str, block_size: int):
        self.ck = ck
        self.precision = precision
        self.block_size = block_size
        self._quant: dict[str, tuple[np.ndarray, np.ndarray, int]] = {}

    def key(self, suffix: str) -> str:
        return self.ck.find(suffix, TEXT_PREFIXES)

    def _fp32(self, key: str) -> np.ndarray:
        return self.ck.tensor(key).float().numpy()

    def vector(self, suffix: str) -> ir.TensorProtocol:
        key = self.key(suffix)
        shape = self.ck_shape(key)
        return ir.LazyTensor(lambda: ir.tensor(self._fp32(key)), dtype=F32, shape=ir.Shape(shape), name=suffix)

    def ck_shape(self, key: str) -> tuple[int, ...]:
        return self.ck.shape(key)

    def matmul_b(self, key: str, name: str) -> ir.TensorProtocol:
        """fp32/fp16 [K, N] (the transpose of torch's Linear weight [N, K])."""
        n, k = self.ck_shape(key)
        dtype = ir.DataType.FLOAT16 if self.precision == "fp16" else F32
        np_dtype = np.float16 if self.precision == "fp16" else np.float32
        return ir.LazyTensor(
            lambda: ir.tensor(np.ascontiguousarray(self._fp32(key).T.astype(np_dtype))), dtype=dtype, shape=ir.Shape([k, n]), name=name
        )

    def int4_parts(self, key: str, name: str) -> tuple[ir.TensorProtocol, ir.TensorProtocol, int, int]:
        """Packed weight and scales as two lazy tensors sharing one quantization."""
        n, k = self.ck_shape(key)
        bs = self.block_size
        kb = (k + bs - 1) // bs

        def get(part: int):
            if key not in self._quant:
                packed, scales = quantize_int4(self._fp32(key).T, bs)
                self._quant[key] = (packed, scales, 0)
            packed, scales, used = self._quant[key]
            if used + 1 == 2:
                del self._quant[key]  # both parts taken: free it
            else:
                self._quant[key] = (packed, scales, used + 1)
            return ir.tensor(packed if part == 0 else scales)

        qb = ir.LazyTensor(lambda: get(0), dtype=ir.DataType.UINT8, shape=ir.Shape([n, kb, bs // 2]), name=f"{name}.qweight")
        sc = ir.LazyTensor(lambda: get(1), dtype=F32, shape=ir.Shape([n, kb]), name=f"{name}.scales")
        return qb, sc, k, n


def build_decoder_model(
    ck: Checkpoint,
    options: DecoderOptions | None = None,
    *,
    layers: int | None = None,
    **fields,
) -> tuple[ir.Model, DecoderSpec]:
    """The decoder graph for ``options`` (a :class:`~qwen3vl_compile.options.DecoderOptions`;
    keyword ``fields`` override single options, e.g. ``precision="fp32"``). ``layers``: build
    only the first ``layers`` decoder layers (then the final norm and lm_head), for the
    parity gate's truncated slice; default all."""
    o = (options or DecoderOptions()).replace(**fields)
    precision, block_size, accuracy_level = o.precision, o.block_size, o.accuracy_level
    keep_lm_head_fp, logits, context_length = o.keep_lm_head_fp, o.logits, o.context_length
    spec = DecoderSpec.from_checkpoint(ck, context_length)
    if layers is not None:
        if not 1 <= layers <= spec.layers:
            raise UsageError(f"layers {layers}: the checkpoint has {spec.layers} text layers")
        spec = dataclasses.replace(spec, layers=layers)
    W = _Weights(ck, precision, block_size)
    b = _Builder()
    nh, kvh, hd, H = spec.heads, spec.kv_heads, spec.head_dim, spec.hidden

    embeds = ir.Value(name="inputs_embeds", type=ir.TensorType(F32), shape=ir.Shape(["batch_size", "sequence_length", H]))
    mask = ir.Value(name="attention_mask", type=ir.TensorType(I64), shape=ir.Shape(["batch_size", "total_sequence_length"]))
    pos = ir.Value(name="position_ids", type=ir.TensorType(I64), shape=ir.Shape([3, "batch_size", "sequence_length"]))
    inputs = [embeds, mask, pos]
    outputs: list[ir.Value] = []
    presents: list[ir.Value] = []

    def linear(x: ir.Value, suffix: str, name: str, *, weight_key: str | None = None, quantize: bool = True) -> ir.Value:
        key = weight_key or W.key(suffix)
        if precision == "int4" and quantize:
            qb, sc, k, n = W.int4_parts(key, name)
            return b.op1(
                "MatMulNBits",
                [x, b.init(f"{name}.qweight", qb), b.init(f"{name}.scales", sc)],
                f"{name}/MatMulNBits",
                domain="com.microsoft",
                K=k,
                N=n,
                bits=4,
                block_size=block_size,
                accuracy_level=accuracy_level,
            )
        wb = b.init(f"{name}.weight", W.matmul_b(key, f"{name}.weight"))
        if precision == "fp16":  # stored in fp16, computed in fp32 (ORT folds the Cast at load)
            wb = b.op1("Cast", [wb], f"{name}/CastWeight", to=F32)
        return b.op1("MatMul", [x, wb], f"{name}/MatMul")

    # Preprocessing shared by all layers: GQA's seqlens_k and total_sequence_length.
    mask_sum = b.op1("ReduceSum", [mask, b.const(np.array([1], np.int64))], "/model/attn_mask_reformat/ReduceSum", keepdims=0)
    seqlens = b.op1("Sub", [mask_sum, b.const(np.array(1, np.int64))], "/model/attn_mask_reformat/Sub")
    seqlens_k = b.op1("Cast", [seqlens], "/model/attn_mask_reformat/seqlens_k", to=I32)
    mshape = b.op1("Shape", [mask], "/model/attn_mask_reformat/Shape")
    total = b.op1("Gather", [mshape, b.const(np.array(1, np.int64))], "/model/attn_mask_reformat/Gather", axis=0)
    total_len = b.op1("Cast", [total], "/model/attn_mask_reformat/total_seq_len", to=I32)
    cos, sin = rope_cache(spec)
    cos_cache = b.init("cos_cache", ir.tensor(cos, name="cos_cache"))
    sin_cache = b.init("sin_cache", ir.tensor(sin, name="sin_cache"))
    split_heads = {n: b.const(np.array([0, 0, n, hd], np.int64)) for n in {nh, kvh}}
    merge_heads = {n: b.const(np.array([0, 0, n * hd], np.int64)) for n in {nh, kvh}}

    def head_norm(x, n_heads, suffix, name):
        r = b.op1("Reshape", [x, split_heads[n_heads]], f"{name}/Reshape_1")
        w = b.init(f"{name}.weight", W.vector(suffix))
        y = b.op1("RMSNormalization", [r, w], f"{name}/RMSNormalization", axis=-1, epsilon=spec.eps, stash_type=1)
        return b.op1("Reshape", [y, merge_heads[n_heads]], f"{name}/Reshape_2")

    residual = embeds
    w_in = b.init("model.layers.0.input_layernorm.weight", W.vector("layers.0.input_layernorm.weight"))
    h = b.op1("RMSNormalization", [embeds, w_in], "/model/layers.0/input_layernorm/LayerNorm", axis=-1, epsilon=spec.eps, stash_type=1)
    for i in range(spec.layers):
        p = f"layers.{i}."
        n = f"/model/layers.{i}"
        q = linear(h, p + "self_attn.q_proj.weight", f"{n}/attn/q_proj")
        k = linear(h, p + "self_attn.k_proj.weight", f"{n}/attn/k_proj")
        v = linear(h, p + "self_attn.v_proj.weight", f"{n}/attn/v_proj")
        q = head_norm(q, nh, p + "self_attn.q_norm.weight", f"{n}/attn/q_norm")
        k = head_norm(k, kvh, p + "self_attn.k_norm.weight", f"{n}/attn/k_norm")
        rope_attrs = dict(domain="com.microsoft", mrope_section=list(spec.mrope_section), mrope_layout=1, interleaved=0)
        q = b.op1("MRotaryEmbedding", [q, pos, cos_cache, sin_cache], f"{n}/attn/q_rotary/MRotaryEmbedding", num_heads=nh, **rope_attrs)
        k = b.op1("MRotaryEmbedding", [k, pos, cos_cache, sin_cache], f"{n}/attn/k_rotary/MRotaryEmbedding", num_heads=kvh, **rope_attrs)
        past_k = ir.Value(name=f"past_key_values.{i}.key", type=ir.TensorType(F32), shape=ir.Shape(["batch_size", kvh, "past_sequence_length", hd]))
        past_v = ir.Value(name=f"past_key_values.{i}.value", type=ir.TensorType(F32), shape=ir.Shape(["batch_size", kvh, "past_sequence_length", hd]))
        inputs += [past_k, past_v]
        attn, pk, pv = b.op(
            "GroupQueryAttention",
            [q, k, v, past_k, past_v, seqlens_k, total_len],
            f"{n}/attn/GroupQueryAttention",
            outputs=3,
            domain="com.microsoft",
            num_heads=nh,
            kv_num_heads=kvh,
            scale=float(hd**-0.5),
        )
        pk.name, pv.name = f"present.{i}.key", f"present.{i}.value"
        for pv_ in (pk, pv):
            pv_.type = ir.TensorType(F32)
            pv_.shape = ir.Shape(["batch_size", kvh, "total_sequence_length", hd])
        presents += [pk, pv]
        o = linear(attn, p + "self_attn.o_proj.weight", f"{n}/attn/o_proj")
        w_post = b.init(f"model.layers.{i}.post_attention_layernorm.weight", W.vector(p + "post_attention_layernorm.weight"))
        h2, _, _, residual = b.op(
            "SkipSimplifiedLayerNormalization",
            [o, residual, w_post],
            f"{n}/post_attention_layernorm/SkipLayerNorm",
            outputs=4,
            domain="com.microsoft",
            epsilon=spec.eps,
        )
        if is_moe_layer(ck.text_config, i):
            down = moe_mlp(b, h2, W, p, f"{n}/mlp", **moe_kwargs(ck.text_config), precision=precision,
                           block_size=block_size, accuracy_level=accuracy_level)
        else:
            gate = linear(h2, p + "mlp.gate_proj.weight", f"{n}/mlp/gate_proj")
            up = linear(h2, p + "mlp.up_proj.weight", f"{n}/mlp/up_proj")
            silu = b.op1("Mul", [gate, b.op1("Sigmoid", [gate], f"{n}/mlp/act_fn/Sigmoid")], f"{n}/mlp/act_fn/Mul")
            down = linear(b.op1("Mul", [silu, up], f"{n}/mlp/Mul"), p + "mlp.down_proj.weight", f"{n}/mlp/down_proj")
        last = i == spec.layers - 1
        nxt = "/model/norm/SkipLayerNorm" if last else f"/model/layers.{i + 1}/input_layernorm/SkipLayerNorm"
        w_next = b.init(
            "model.norm.weight" if last else f"model.layers.{i + 1}.input_layernorm.weight",
            W.vector("norm.weight" if last else f"layers.{i + 1}.input_layernorm.weight"),
        )
        h, _, _, residual = b.op(
            "SkipSimplifiedLayerNormalization", [down, residual, w_next], nxt, outputs=4, domain="com.microsoft", epsilon=spec.eps
        )

    if logits == "last":
        h = b.op1(
            "Slice",
            [h, b.const(np.array([-1], np.int64)), b.const(np.array([np.iinfo(np.int64).max], np.int64)), b.const(np.array([1], np.int64))],
            "/model/last_position/Slice",
        )
    head_key = W.key("embed_tokens.weight") if spec.tie_word_embeddings else _lm_head_key(ck)
    out = linear(h, "", "/lm_head", weight_key=head_key, quantize=not keep_lm_head_fp)
    out.name = "logits"
    out.type = ir.TensorType(F32)
    out.shape = ir.Shape(["batch_size", 1 if logits == "last" else "sequence_length", spec.vocab])
    outputs = [out, *presents]

    graph = ir.Graph(
        inputs=inputs,
        outputs=outputs,
        nodes=b.nodes,
        initializers=b.initializers,
        opset_imports={"": 23, "com.microsoft": 1},
        name="qwen3vl_text_decoder",
    )
    model = ir.Model(graph, ir_version=10, producer_name="qwen3vl-compile")
    return model, spec


def _lm_head_key(ck: Checkpoint) -> str:
    for k in ("lm_head.weight", "model.lm_head.weight"):
        if k in ck.keys():
            return k
    raise ExportError(f"{ck.path}: no lm_head.weight and tie_word_embeddings is false")


def save_streaming(model: ir.Model, path: Path, progress: Callable[[str], None] | None = None) -> list[str]:
    """Save with external data; lazy weights are evaluated (and quantized) one at a time."""
    data = f"{path.name}.data"
    count = {"n": 0}
    total = len(model.graph.initializers)

    def callback(tensor, info):
        count["n"] += 1
        if progress and (count["n"] % 50 == 0 or count["n"] == total):
            progress(f"  wrote {count['n']}/{total} tensors of {path.name}")

    ir.save(model, path, external_data=data, callback=callback, max_workers=1, max_in_flight_bytes=256 << 20)
    return [data]
