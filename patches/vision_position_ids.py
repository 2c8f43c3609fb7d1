"""Patch ``modeling_qwen3_vl.get_vision_position_ids``: rotary (row, col) ids baked per grid.

Why export fails without it: upstream builds the ids in a Python loop over
``grid_thw.tolist()`` with ``torch.arange(h)``; under torch.export every ``h`` becomes an
unbacked data-dependent symbol, and TorchScript bakes whatever grid it traced. With a fixed
bucket the ids are a constant, so we compute them once with the upstream function (so the
values are Hugging Face's own) and return that constant, int64.
"""

from __future__ import annotations

import torch
from transformers.models.qwen3_vl import modeling_qwen3_vl as upstream

from .base import Patch
from .grids import PatchedGrids

TARGET = upstream


def make_patch(grids: PatchedGrids, spatial_merge_size: int) -> Patch:
    original = upstream.get_vision_position_ids
    ids = original(grids.tensor(), spatial_merge_size).to(torch.int64)

    def get_vision_position_ids(grid_thw, merge_size, include_temporal=False, kwargs=None):
        if kwargs is not None and (pre := kwargs.pop("position_ids", None)) is not None:
            return pre
        if include_temporal:
            return original(grid_thw, merge_size, include_temporal=True, kwargs=kwargs)
        grids.check(grid_thw, "get_vision_position_ids")
        return ids.to(grid_thw.device)

    return Patch(TARGET, "get_vision_position_ids", get_vision_position_ids, reason=__doc__.split("\n\n")[1])
