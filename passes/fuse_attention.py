"""FuseAttentionPass: each vision block's attention becomes one ONNX Runtime
``MultiHeadAttention`` (com.microsoft) node, using onnxscript's ORT fusion rules.

Rules (onnxscript.rewriter.ort_fusions):

1. ``MatMul(q, Transpose(k)) * scale -> [Add mask] -> Softmax -> MatMul(v)`` becomes an
   ``SDPA`` function node (``fuse_sdpa``; shape inference runs first so the rule can check
   head sizes).
2. Each ``SDPA`` over ``[B, heads, S, head_dim]`` q/k/v becomes ``MultiHeadAttention`` with
   the q/k/v transposes folded in (``replace_sdpa_by_mha``).
3. Leftover helper functions are inlined and unused nodes removed.

            q    k    v                        q    k    v
            |    |    |                         \\   |   /
   MatMul(q,kT)*s |    |          ==>       MultiHeadAttention
        Softmax   |    |                           |
          MatMul(.., v)                          out

ONNX Runtime's CPU kernel for MultiHeadAttention runs the attention in one fused,
multi-threaded kernel instead of five separate ops. ``stats`` counts fused blocks.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes import common
from onnxscript.optimizer import optimize
from onnxscript.rewriter.ort_fusions.sdpa import fuse_sdpa
from onnxscript.rewriter.ort_fusions.sdpa_via_mha import replace_sdpa_by_mha

from .base import ReportedPassResult


class FuseAttentionPass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ReportedPassResult:
        common.ShapeInferencePass()(model)
        sdpa = fuse_sdpa(model, apply_shape_inference=True)
        mha = replace_sdpa_by_mha(model) if sdpa else 0
        if sdpa:
            optimize(model)
        stats = {"sdpa_matched": int(sdpa), "multi_head_attention": int(mha)}
        if sdpa and mha != sdpa:
            # A half-fused graph still runs (SDPA functions are inlined back), but say so.
            stats["sdpa_left_unfused"] = int(sdpa - mha)
        return ReportedPassResult(model, bool(sdpa), stats=stats)
