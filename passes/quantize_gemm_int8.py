"""QuantizeGemmInt8Pass: the vision tower's linear layers as int8 weights, dynamic int8 activations.

A vision graph at fp32 runs at the CPU's sgemm rate in ONNX Runtime as in PyTorch; an int8
GEMM (VNNI / AMX on x86) is the lever left. Every linear layer of the exported tower is a
``Gemm(x, W[N, K], b)`` with ``transB=1``. Rules:

1. A ``Gemm`` (default domain) is rewritten when ``B`` and ``C`` (if any: the exporter drops
   an all-zero bias) are constant, ``B`` is 2-D
   fp32, ``transA`` is 0, ``transB`` is 1 and ``alpha``/``beta`` are 1. Anything else (and every
   ``Conv``: the patch embedding stays fp32) is left alone and counted as skipped.
2. ``W`` is quantized symmetrically per output column: ``scale[n] = max|W[n, :]| / 127``,
   ``q = round(W / scale)`` clipped to [-127, 127], stored transposed as int8 ``[K, N]``. A
   column of zeros gets scale 1 (its codes are all 0, so it stays exactly 0).
3. Activations are quantized per call. ``activations="per-token"`` (the default): each row of
   ``x`` (one token) gets its own symmetric scale ``max|x[m, :]| / 127``, codes shifted to
   uint8 around 128, then ``MatMulInteger(xq, q, 128)`` (ONNX Runtime's u8s8 int8 GEMM),
   rescaled by ``row scale * column scale``, plus the fp32 bias: seven cheap elementwise nodes
   around one int8 GEMM. ``activations="per-tensor"``: one fused
   ``com.microsoft.DynamicQuantizeMatMul(x, q, scale, <no zero point>, b)``, one asymmetric
   scale for the whole ``x``; about 2x faster again, but a single large-norm token (vision
   transformers grow a few) coarsens every other token's codes: on the trained tiny tower's
   any-size graph it moved image features by up to 64% of their range, against under 1% per
   token (``benchmarks/vision_int8.py`` measures both). The output keeps its value name; the
   fp32 weights leave the graph.

The full int8 range is used (no "reduce range"): measured on the trained tiny tower, 7-bit
weights moved DeepStack features ~10x more than 8-bit. Weights are quantized when the model
is saved (lazily), so the pass holds no second copy of the tower.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from .base import ReportedPassResult

QMAX = 127


def quantize_columns(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``w [N, K]`` fp32 -> (int8 codes ``[K, N]``, fp32 scales ``[N]``), symmetric per row of
    ``w`` (a column of the MatMul)."""
    w = np.asarray(w, dtype=np.float32)
    amax = np.abs(w).max(axis=1)
    scale = np.where(amax > 0, amax / QMAX, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale[:, None]), -QMAX, QMAX).astype(np.int8)
    return np.ascontiguousarray(q.T), scale


def _attr(node: ir.Node, name: str, default):
    a = node.attributes.get(name)
    return default if a is None else a.value


def _quantizable(node: ir.Node) -> bool:
    if node.op_type != "Gemm" or node.domain not in ("", "ai.onnx") or len(node.inputs) not in (2, 3):
        return False
    b, c = node.inputs[1], node.inputs[2] if len(node.inputs) == 3 else None
    if b is None or b.const_value is None or (c is not None and c.const_value is None):
        return False
    if b.const_value.dtype != ir.DataType.FLOAT or len(b.const_value.shape) != 2:
        return False
    return (_attr(node, "transA", 0) == 0 and _attr(node, "transB", 0) == 1
            and _attr(node, "alpha", 1.0) == 1.0 and _attr(node, "beta", 1.0) == 1.0)


# Nodes that carry a projection's output towards attention without another weight product.
_PRODUCTS = {"Gemm", "MatMul", "Conv", "DynamicQuantizeMatMul", "MatMulInteger", "MultiHeadAttention"}
_REACH = 12


def feeds_attention_scores(node: ir.Node) -> bool:
    """Whether ``node``'s output reaches attention scores: a ``MultiHeadAttention``'s query or
    key, or a ``MatMul`` of two computed tensors (``q @ k^T`` of an unfused graph), through at
    most ``_REACH`` nodes that are not themselves weight products (reshapes, splits, rotary)."""
    frontier, seen = [node.outputs[0]], set()
    for _ in range(_REACH):
        nxt = []
        for value in frontier:
            for user, index in value.uses():
                if user.op_type == "MultiHeadAttention" and index in (0, 1):
                    return True
                if user.op_type == "MatMul" and all(i is not None and i.const_value is None for i in user.inputs):
                    return True
                if id(user) in seen:
                    continue
                seen.add(id(user))
                if user.op_type not in _PRODUCTS:
                    nxt.extend(user.outputs)
        frontier = nxt
    return False


def _lazy(source: ir.TensorProtocol, part: int, name: str, dtype: ir.DataType, shape) -> ir.LazyTensor:
    return ir.LazyTensor(lambda: ir.tensor(quantize_columns(source.numpy())[part], name=name),
                         dtype=dtype, shape=ir.Shape(shape), name=name)


ACTIVATIONS = ("per-token", "per-tensor")


class QuantizeGemmInt8Pass(ir.passes.InPlacePass):
    def __init__(self, activations: str = "per-token", keep_attention_inputs: bool = True):
        super().__init__()
        if activations not in ACTIVATIONS:
            raise ValueError(f"activations {activations!r}: one of {ACTIVATIONS}")
        self.activations = activations
        self.keep_attention_inputs = keep_attention_inputs

    def call(self, model: ir.Model) -> ReportedPassResult:
        graph = model.graph
        self._consts: dict[str, ir.Value] = {}
        self._opset = model.opset_imports.get("", 17)
        done = skipped = kept = 0
        fp32_bytes = int8_bytes = 0
        for node in list(graph):
            if node.op_type != "Gemm":
                continue
            if not _quantizable(node):
                skipped += 1
                continue
            if self.keep_attention_inputs and feeds_attention_scores(node):
                kept += 1
                continue
            fp32_bytes += node.inputs[1].const_value.nbytes
            int8_bytes += self._rewrite(graph, node)
            done += 1
        if done:
            model.opset_imports.setdefault("com.microsoft", 1)
        return ReportedPassResult(model, done > 0, stats={
            "activations": self.activations, "gemms_quantized": done, "gemms_skipped": skipped,
            "gemms_kept_fp32_attention_inputs": kept,
            "weight_bytes_fp32": fp32_bytes, "weight_bytes_int8": int8_bytes,
        })

    def _const(self, graph: ir.Graph, key: str, array: np.ndarray) -> ir.Value:
        if key not in self._consts:
            name = _unique(graph, key)
            v = ir.Value(name=name, type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                         shape=ir.Shape(array.shape), const_value=ir.tensor(array, name=name))
            graph.register_initializer(v)
            self._consts[key] = v
        return self._consts[key]

    def _rewrite(self, graph: ir.Graph, node: ir.Node) -> int:
        x, w = node.inputs[:2]
        bias = node.inputs[2] if len(node.inputs) == 3 else None
        n, k = w.const_value.shape
        base = w.name or node.name
        values = []
        for part, suffix, dtype, shape in ((0, "int8", ir.DataType.INT8, (k, n)), (1, "scale", ir.DataType.FLOAT, (n,))):
            name = f"{base}.{suffix}"
            v = ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(shape),
                         const_value=_lazy(w.const_value, part, name, dtype, shape))
            graph.register_initializer(v)
            values.append(v)
        prefix = f"{node.name or base}/int8"
        if self.activations == "per-tensor":
            inputs = [x, values[0], values[1], None, bias]
            while inputs[-1] is None:
                inputs.pop()
            new = [ir.Node("com.microsoft", "DynamicQuantizeMatMul", inputs, name=prefix)]
        else:
            new = self._per_token(graph, prefix, x, values[0], values[1], bias)
        old = node.outputs[0]
        out = new[-1].outputs[0]
        name, old.name = old.name, f"{old.name}/fp32"
        out.name, out.dtype, out.shape = name, old.dtype, old.shape
        graph.insert_before(node, new)
        ir.convenience.replace_all_uses_with(old, out, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        if not w.uses() and graph.initializers.get(w.name) is w:
            graph.initializers.pop(w.name)
        return k * n + 4 * n

    def _per_token(self, graph, prefix, x, q, scale, bias) -> list[ir.Node]:
        """Nodes computing ``(rowscale * colscale) * MatMulInteger(u8(x / rowscale) , q) + b``."""
        nodes: list[ir.Node] = []

        def op(op_type, *inputs, **attrs):
            n = ir.Node("", op_type, list(inputs), attributes=[ir.AttrInt64(k, v) for k, v in attrs.items()],
                        name=f"{prefix}/{op_type}_{len(nodes)}")
            nodes.append(n)
            return n.outputs[0]

        f32 = np.float32
        absx = op("Abs", x)
        if self._opset >= 18:
            amax = op("ReduceMax", absx, self._const(graph, "int8_last_axis", np.array([-1], np.int64)),
                      keepdims=1)
        else:
            n = ir.Node("", "ReduceMax", [absx], attributes=[ir.AttrInt64s("axes", [-1]), ir.AttrInt64("keepdims", 1)],
                        name=f"{prefix}/ReduceMax")
            nodes.append(n)
            amax = n.outputs[0]
        # A zero row gets a tiny positive scale: its codes are all 0 and its output is the bias.
        amax = op("Max", amax, self._const(graph, "int8_tiny", np.array(1e-30, f32)))
        rscale = op("Div", amax, self._const(graph, "int8_qmax", np.array(QMAX, f32)))
        codes = op("Round", op("Div", x, rscale))
        shifted = op("Add", codes, self._const(graph, "int8_shift", np.array(128, f32)))
        xq = op("Cast", shifted, to=ir.DataType.UINT8.value)
        acc = op("MatMulInteger", xq, q, self._const(graph, "int8_zero_point", np.array(128, np.uint8)))
        y = op("Cast", acc, to=ir.DataType.FLOAT.value)
        y = op("Mul", y, rscale)
        y = op("Mul", y, scale)
        if bias is not None:
            op("Add", y, bias)
        return nodes


def _unique(graph: ir.Graph, name: str) -> str:
    return name if name not in graph.initializers else f"{name}_{len(graph.initializers)}"
