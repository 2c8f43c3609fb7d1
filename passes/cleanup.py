"""CleanupPass: constant folding and dead-code removal after export.

Rules:

1. Fold every node whose inputs are all constants (onnxscript's constant folder), within
   size limits large enough for the vision position table: with a bucket's constant
   interpolation indices and weights, ``Gather(pos_embed) * weights -> ReduceSum`` becomes
   one precomputed ``[patches, hidden]`` initializer per bucket.
2. Remove Identity nodes, then common subexpressions, then nodes whose outputs are unused.
3. Drop initializers no node uses any more, and opset imports no node uses.

``stats`` reports nodes and initializers before and after, and what was folded.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes import common
from onnxscript.optimizer._constant_folding import FoldConstantsPass

from .base import ReportedPassResult


class CleanupPass(ir.passes.InPlacePass):
    def __init__(self, *, input_size_limit: int = 1 << 23, output_size_limit: int = 1 << 25):
        self.input_size_limit = input_size_limit
        self.output_size_limit = output_size_limit

    def call(self, model: ir.Model) -> ReportedPassResult:
        before_nodes = _count_nodes(model)
        before_inits = len(model.graph.initializers)
        fold = FoldConstantsPass(
            shape_inference=False,
            input_size_limit=self.input_size_limit,
            output_size_limit=self.output_size_limit,
        )(model)
        modified = fold.modified
        for p in (
            common.IdentityEliminationPass(),
            common.CommonSubexpressionEliminationPass(),
            common.RemoveUnusedNodesPass(),
            common.RemoveUnusedOpsetsPass(),
        ):
            modified = p(model).modified or modified
        stats = {
            "nodes_before": before_nodes,
            "nodes_after": _count_nodes(model),
            "initializers_before": before_inits,
            "initializers_after": len(model.graph.initializers),
        }
        return ReportedPassResult(model, modified, stats=stats)


def _count_nodes(model: ir.Model) -> int:
    return sum(1 for _ in ir.traversal.RecursiveGraphIterator(model.graph))
