"""Patch ``modeling_qwen3_vl.get_vision_attention_seqlens``: attention segment boundaries as
an int64 constant per grid (int64 unification of the index tensors).

Why export fails without it: upstream returns ``cu_seqlens`` as **int32** (int64 only while
``torch.jit`` traces) next to int64 ``grid_thw`` and position ids; exporters then emit
Concat/Sub/Slice nodes mixing int32 and int64, which ONNX Runtime rejects ("Type parameter
(T) of Optype (Concat) bound to different types"). It is also computed with
``repeat_interleave`` over data values. Per grid it is a constant: we return it as int64,
together with the maximum segment length as a Python int.
"""

from __future__ import annotations

import torch
from transformers.models.qwen3_vl import modeling_qwen3_vl as upstream

from .base import Patch
from .grids import PatchedGrids

TARGET = upstream


def make_patch(grids: PatchedGrids) -> Patch:
    lengths = [h * w for t, h, w in grids.grids for _ in range(t)]
    cu = torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0)
    max_len = max(lengths)

    def get_vision_attention_seqlens(grid_thw, config, merge_temporal=False, kwargs=None):
        if kwargs is not None:
            kwargs.pop("max_seqlen", None)
            if (pre := kwargs.pop("cu_seqlens", None)) is not None:
                return pre.to(torch.int64), max_len
        grids.check(grid_thw, "get_vision_attention_seqlens")
        return cu.to(grid_thw.device), max_len

    return Patch(TARGET, "get_vision_attention_seqlens", get_vision_attention_seqlens, reason=__doc__.split("\n\n")[1])
