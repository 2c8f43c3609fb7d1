"""The sparse-MoE MLP of ``Qwen3VLMoeForConditionalGeneration`` as ONNX Runtime contrib ops.

What Hugging Face computes (transformers 5.x, ``Qwen3VLMoeTextSparseMoeBlock``), per token x::

    logits  = x @ gate.weight.T                        # [E], in the model dtype
    probs   = softmax(logits) in fp32                  # over all E experts
    w, idx  = topk(probs, k)
    w       = w / sum(w)                               # Qwen3-VL-MoE: ALWAYS (its router has no
                                                       # norm_topk_prob switch); Qwen3-MoE text:
                                                       # only when config.norm_topk_prob
    y       = sum_j w_j * down[idx_j] @ (silu(g) * u),  [g | u] = gate_up[idx_j] @ x

How it is emitted here (``moe_mlp``)::

    x [B, S, H] -> Reshape [T, H] -> MatMul(gate.weight^T) -> router logits [T, E]
    x, logits -> com.microsoft QMoE (int4) or MoE (fp32 / fp16) -> y [B, S, H]

Facts about ONNX Runtime 1.32's CPU kernels, each measured (tests/test_moe_block.py):

- ``router_probs`` takes the raw **logits**: the kernel applies the softmax over all experts
  itself, then top-k. Feeding softmax probabilities instead is wrong (softmax applied twice).
- SwiGLU: CPU accepts only ``swiglu_fusion=1`` (gate and up rows interleaved, g0,u0,g1,u1,...);
  0 and 2 are refused at session creation, for MoE and QMoE alike. Checkpoints store
  ``[gate | up]`` concatenated, so the rows are interleaved here at export: a permutation,
  exact (and for int4 it commutes with quantization, whose blocks run along K within a row).
- ``activation_alpha=1.0, activation_beta=0.0`` and no ``swiglu_limit`` give exactly
  silu(g) * u (the kernel computes G * sigmoid(alpha * G) * (clamp(U) + beta), with G, U
  clamped to ``swiglu_limit`` when it is given). These are the schema defaults in 1.32; they
  are set explicitly anyway (gpt-oss style exports use alpha=1.702, beta=1, limit=7), and
  ``swiglu_limit`` is left unset (= no clamp; measured with pre-activations up to |52|).
- ``normalize_routing_weights=1`` divides the top-k weights by their sum (norm_topk_prob).
- **QMoE ignores ``normalize_routing_weights=0``**: without ``router_weights`` it always
  renormalises the top-k (a softmax over the k selected logits). The float MoE kernel honours 0.
  For norm_topk_prob=False, QMoE gets ``router_weights = Softmax(logits)`` (input 14, 0-based): the
  top-k are still chosen on ``router_probs`` (same order, softmax is monotonic) and the mixing
  weights are the full-softmax probabilities, unnormalised. Exact.
- QMoE int4: per expert, weights uint8 ``[E, N, K/2]`` and scales f32 ``[E, N, K/block_size]``,
  no zero points (8 implied) with ``weights_prepacked=0`` (the raw layout of ONNX Runtime's
  ``quantize_matmul_4bits``): byte for byte MatMulNBits' ``[N, K/bs, bs/2]`` of one expert,
  stacked. So every expert is quantized with ``quantize.quantize_int4``, exactly as a
  MatMulNBits linear of the dense decoder. FC1 is gate_up (N = 2I, K = H), FC2 is down
  (N = H, K = I). Both H and I must be multiples of ``block_size``.
  ``accuracy_level``: 0 keeps fp32 activations (matches dequantized weights to ~1e-7);
  4 quantizes activations to int8 per block (~1e-2 relative on random data).
- The float MoE op's type T is that of the input, so fp16 precision stores the expert weights
  in fp16 and Casts them to fp32 (ONNX Runtime folds the Cast at load), the convention of
  ``text_decoder.linear``: stored in fp16, computed in fp32.

Router: a plain fp32 MatMul also in int4 mode (fp16-stored + Cast in fp16 mode). Its weight is
small (E x H: 1 MiB per layer at 30B-A3B, 1% of a layer's int4 experts) and the top-k choice is
discontinuous: int4 error on the logits would swap experts for tokens near a tie, an error
far larger than the weight error itself. HF too keeps the softmax/top-k in fp32.

Checkpoint keys (suffixes after the text prefix ``model.language_model.``; ``W.key`` resolves
the prefix), for each MoE layer i:

- ``layers.{i}.mlp.gate.weight``            [E, H]   router
- ``layers.{i}.mlp.experts.gate_up_proj``   fused, either [E, 2I, H] (transformers >= 5
  ``save_pretrained``, the in-memory layout) or [E, H, 2I] (the Hub's Qwen3-VL-30B-A3B /
  235B-A22B files, written by transformers 4.57). Decided by shape, as transformers 5's
  loader does (``Transpose(1, 2, check_dims=True)``): when H == 2I both read the same and the
  in-memory layout is taken, like transformers.
- ``layers.{i}.mlp.experts.down_proj``      [E, H, I] or [E, I, H], same rule.
- or, per expert (Qwen3-MoE text style, some re-exports):
  ``layers.{i}.mlp.experts.{e}.gate_proj.weight`` [I, H], ``.up_proj.weight`` [I, H],
  ``.down_proj.weight`` [H, I].

Which layers are sparse: ``is_moe_layer``. Memory: every weight is an ``ir.LazyTensor``; at
save time a layer's FC1 (or FC2) is read one expert at a time (safetensors slices of the fused
tensor) into the output buffer, so at most one layer's FC1 or FC2 is held, plus one expert in
fp32. Quantized weight and scales share one quantization, freed once both are written.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import onnx_ir as ir

from ..errors import ExportError, LoadError
from ..model.support import is_moe_layer, num_experts  # noqa: F401 - is_moe_layer is part of this module's interface
from .quantize import quantize_int4

F32, F16, U8 = ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.UINT8

# Attributes that make ONNX Runtime's SwiGLU exactly silu(gate) * up (see the module docstring).
SWIGLU_ATTRS = dict(activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0)


def moe_kwargs(text_config: dict) -> dict:
    """``moe_mlp``'s model arguments from a checkpoint's text_config.

    norm_topk_prob: transformers' Qwen3VLMoe router always renormalises the top-k, whatever
    the config says (only Qwen3-MoE text reads ``norm_topk_prob``), so for model_type
    ``qwen3_vl_moe_text`` it is True; other model types read the config (default True)."""
    mtype = text_config.get("model_type", "qwen3_vl_moe_text")
    norm = True if mtype == "qwen3_vl_moe_text" else bool(text_config.get("norm_topk_prob", True))
    return dict(
        num_experts=num_experts(text_config),
        top_k=text_config["num_experts_per_tok"],
        norm_topk_prob=norm,
        hidden=text_config["hidden_size"],
        moe_intermediate=text_config["moe_intermediate_size"],
    )


class _Experts:
    """Reads one layer's expert weights from the checkpoint, one expert at a time, in the
    layout the kernels want: FC1 rows interleaved gate/up [2I, H], FC2 [H, I], fp32."""

    def __init__(self, W, layer_prefix: str, E: int, H: int, I: int):
        self.W, self.E, self.H, self.I = W, E, H, I
        p = layer_prefix + "mlp.experts."
        self.fused = _has(W, p + "gate_up_proj")
        if self.fused:
            self.gate_up_key = W.key(p + "gate_up_proj")
            self.down_key = W.key(p + "down_proj")
            self.gate_up_t = _layout(W.ck_shape(self.gate_up_key), (E, 2 * I, H), self.gate_up_key)
            self.down_t = _layout(W.ck_shape(self.down_key), (E, H, I), self.down_key)
        elif _has(W, p + "0.gate_proj.weight"):
            self.keys = [
                tuple(W.key(f"{p}{e}.{part}.weight") for part in ("gate_proj", "up_proj", "down_proj")) for e in range(E)
            ]
            for g, u, d in self.keys:
                for key, want in ((g, (I, H)), (u, (I, H)), (d, (H, I))):
                    if W.ck_shape(key) != want:
                        raise ExportError(f"{key}: shape {W.ck_shape(key)}, expected {want}")
        else:
            raise LoadError(f"no MoE expert weights for {layer_prefix!r}: neither {p}gate_up_proj nor {p}0.gate_proj.weight")

    def fc1(self) -> Iterator[np.ndarray]:
        """Per expert: [2I, H] fp32, rows g0, u0, g1, u1, ... (swiglu_fusion=1)."""
        I = self.I
        if self.fused:
            for w in self._slices(self.gate_up_key):
                w = w.T if self.gate_up_t else w  # [2I, H]: gate rows 0..I-1, up rows I..2I-1
                yield _interleave(w[:I], w[I:])
        else:
            for g, u, _ in self.keys:
                yield _interleave(_fp32(self.W, g), _fp32(self.W, u))

    def fc2(self) -> Iterator[np.ndarray]:
        """Per expert: [H, I] fp32 (torch Linear layout: N = H outputs, K = I inputs)."""
        if self.fused:
            for w in self._slices(self.down_key):
                yield w.T if self.down_t else w
        else:
            for _, _, d in self.keys:
                yield _fp32(self.W, d)

    def _slices(self, key: str):
        """One expert of a fused [E, a, b] tensor at a time (safetensors reads only that slice)."""
        from safetensors import safe_open

        with safe_open(str(self.W.ck._weight_map()[key]), framework="pt") as f:
            sl = f.get_slice(key)
            for e in range(self.E):
                yield sl[e : e + 1].float().numpy()[0]


def _has(W, suffix: str) -> bool:
    try:
        W.key(suffix)
        return True
    except LoadError:
        return False


def _fp32(W, key: str) -> np.ndarray:
    return W.ck.tensor(key).float().numpy()


def _layout(stored: tuple[int, ...], memory: tuple[int, int, int], key: str) -> bool:
    """True when the stored tensor is the transpose (dims 1, 2) of the in-memory layout."""
    stored = tuple(stored)
    if stored == memory:
        return False
    if stored == (memory[0], memory[2], memory[1]):
        return True
    raise ExportError(f"{key}: shape {stored}, expected {memory} or {(memory[0], memory[2], memory[1])}")


def _interleave(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """[I, H] and [I, H] -> [2I, H] with rows gate0, up0, gate1, up1, ..."""
    return np.stack([gate, up], axis=1).reshape(2 * gate.shape[0], gate.shape[1])


class _Shared:
    """Several lazy tensors computed by one function call (a quantization gives packed
    weights and scales): computed on the first request, freed once every part was taken."""

    def __init__(self, compute: Callable[[], tuple[np.ndarray, ...]]):
        self.compute = compute
        self.parts: tuple[np.ndarray, ...] | None = None
        self.taken: set[int] = set()

    def get(self, i: int) -> ir.TensorProtocol:
        if self.parts is None:
            self.parts, self.taken = self.compute(), set()
        arr = self.parts[i]
        self.taken.add(i)
        if len(self.taken) == len(self.parts):
            self.parts = None  # everything handed out: free it
        return ir.tensor(arr)


def _quantized(experts: Callable[[], Iterator[np.ndarray]], E: int, N: int, K: int, bs: int) -> Callable[[], tuple]:
    """Quantize every expert's [N, K] weight like MatMulNBits: ([E, N, K/2] u8, [E, N, K/bs] f32)."""

    def compute():
        packed = np.empty((E, N, K // 2), np.uint8)
        scales = np.empty((E, N, K // bs), np.float32)
        for e, w in enumerate(experts()):
            q, s = quantize_int4(w.T, bs)  # takes [K, N]; gives [N, K/bs, bs/2], [N, K/bs]
            packed[e] = q.reshape(N, K // 2)
            scales[e] = s
        return packed, scales

    return compute


def _stacked(experts: Callable[[], Iterator[np.ndarray]], E: int, N: int, K: int, np_dtype) -> Callable[[], ir.TensorProtocol]:
    def compute():
        out = np.empty((E, N, K), np_dtype)
        for e, w in enumerate(experts()):
            out[e] = w
        return ir.tensor(out)

    return compute


def moe_mlp(
    b,
    x: ir.Value,
    W,
    layer_prefix: str,
    name: str,
    *,
    num_experts: int,
    top_k: int,
    norm_topk_prob: bool,
    hidden: int,
    moe_intermediate: int,
    precision: str,
    block_size: int,
    accuracy_level: int,
) -> ir.Value:
    """Emit the sparse-MoE MLP of one decoder layer; returns its output [B, S, H] f32.

    b: ``text_decoder._Builder``; x: the post-attention-normed hidden state [B, S, H] f32;
    W: ``text_decoder._Weights``; layer_prefix: checkpoint suffix of the layer, e.g.
    ``"layers.3."``; name: node-name prefix, e.g. ``"/model/layers.3/mlp"``.
    precision "int4" -> QMoE (4-bit, ``block_size`` along K, ``accuracy_level`` as
    MatMulNBits); "fp32" / "fp16" -> MoE (fp16: weights stored fp16, computed fp32)."""
    E, H, I, k = num_experts, hidden, moe_intermediate, top_k
    if precision not in ("int4", "fp16", "fp32"):
        raise ExportError(f"precision {precision!r}: choose int4, fp16 or fp32")
    if not 1 <= k <= E:
        raise ExportError(f"top_k {k} must be in 1..num_experts ({E})")
    p = name.rstrip("/")
    # Init names follow the checkpoint's module path (as text_decoder names its weights).
    wname = "model." + layer_prefix + "mlp"

    # ---- router: logits [T, E] = x [T, H] @ gate.weight^T -----------------------------------
    gate_key = W.key(layer_prefix + "mlp.gate.weight")
    if tuple(W.ck_shape(gate_key)) != (E, H):
        raise ExportError(f"{gate_key}: shape {W.ck_shape(gate_key)}, expected {(E, H)}")
    gw = b.init(f"{wname}.gate.weight", W.matmul_b(gate_key, f"{wname}.gate.weight"))  # [H, E] (fp16 in fp16 mode)
    if precision == "fp16":
        gw = b.op1("Cast", [gw], f"{p}/gate/CastWeight", to=F32)
    x2d = b.op1("Reshape", [x, b.const(np.array([-1, H], np.int64))], f"{p}/gate/Reshape")
    logits = b.op1("MatMul", [x2d, gw], f"{p}/gate/MatMul")  # raw logits: the kernel does the softmax

    experts = _Experts(W, layer_prefix, E, H, I)
    common = dict(domain="com.microsoft", k=k, normalize_routing_weights=int(norm_topk_prob), **SWIGLU_ATTRS)

    if precision == "int4":
        bs = block_size
        if H % bs or I % bs or bs < 16 or bs & (bs - 1):
            raise ExportError(f"QMoE: hidden {H} and moe_intermediate {I} must be multiples of block_size {bs} (a power of two >= 16)")

        def parts(shared: _Shared, label: str, N: int, K: int) -> tuple[ir.Value, ir.Value]:
            q = ir.LazyTensor(lambda: shared.get(0), dtype=U8, shape=ir.Shape([E, N, K // 2]), name=f"{label}.qweight")
            s = ir.LazyTensor(lambda: shared.get(1), dtype=F32, shape=ir.Shape([E, N, K // bs]), name=f"{label}.scales")
            # Added one after the other, so the save writes both before the next quantization.
            return b.init(f"{label}.qweight", q), b.init(f"{label}.scales", s)

        fc1_q, fc1_s = parts(_Shared(_quantized(experts.fc1, E, 2 * I, H, bs)), f"{wname}.experts.gate_up_proj", 2 * I, H)
        fc2_q, fc2_s = parts(_Shared(_quantized(experts.fc2, E, H, I, bs)), f"{wname}.experts.down_proj", H, I)
        # QMoE inputs: 0 input, 1 router_probs, 2 fc1_w, 3 fc1_scales, 4 fc1_bias, 5 fc2_w,
        # 6 fc2_scales, 7 fc2_bias, 8..10 fc3 w/scales/bias, 11..13 zero points, 14 router_weights.
        inputs: list[ir.Value | None] = [x, logits, fc1_q, fc1_s, None, fc2_q, fc2_s]
        if not norm_topk_prob:
            # QMoE renormalises the top-k unless it mixes with router_weights (module docstring).
            probs = b.op1("Softmax", [logits], f"{p}/gate/Softmax", axis=-1)
            inputs += [None] * 7 + [probs]
        out = b.op1(
            "QMoE",
            inputs,
            f"{p}/QMoE",
            expert_weight_bits=4,
            block_size=bs,
            accuracy_level=accuracy_level,
            weights_prepacked=0,
            **common,
        )
    else:
        np_dtype, dtype = (np.float16, F16) if precision == "fp16" else (np.float32, F32)
        fc1 = b.init(
            f"{wname}.experts.gate_up_proj",
            ir.LazyTensor(_stacked(experts.fc1, E, 2 * I, H, np_dtype), dtype=dtype, shape=ir.Shape([E, 2 * I, H]), name=f"{wname}.experts.gate_up_proj"),
        )
        fc2 = b.init(
            f"{wname}.experts.down_proj",
            ir.LazyTensor(_stacked(experts.fc2, E, H, I, np_dtype), dtype=dtype, shape=ir.Shape([E, H, I]), name=f"{wname}.experts.down_proj"),
        )
        if precision == "fp16":  # the MoE op's weights share the input's type
            fc1 = b.op1("Cast", [fc1], f"{p}/experts/CastGateUp", to=F32)
            fc2 = b.op1("Cast", [fc2], f"{p}/experts/CastDown", to=F32)
        # MoE inputs: 0 input, 1 router_probs, 2 fc1_w, 3 fc1_bias, 4 fc2_w (5..7 unused).
        out = b.op1("MoE", [x, logits, fc1, None, fc2], f"{p}/MoE", **common)

    out.type = ir.TensorType(F32)
    if x.shape is not None:
        out.shape = ir.Shape(list(x.shape))
    return out
