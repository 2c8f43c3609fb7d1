"""Patch ``modeling_qwen3_vl.get_vision_interpolation_indices_and_weights``: the bilinear
resampling of the learned 48x48 position table, computed once per grid and baked as constants.

Why export fails without it: the 4 taps and 4 weights per patch come from
``repeat_interleave`` over ``grid_thw`` values and per-axis sizes taken from the data
(``GuardOnDataDependentSymNode`` under torch.export). Per bucket they are constants: we
compute them with the upstream function itself (indices int64, weights float32) and the
exported graph gathers from the table with constant indices, which constant folding can
turn into one precomputed position table per bucket.
"""

from __future__ import annotations

import torch
from transformers.models.qwen3_vl import modeling_qwen3_vl as upstream

from .base import Patch
from .grids import PatchedGrids

TARGET = upstream


def make_patch(grids: PatchedGrids, num_grid_per_side: int, spatial_merge_size: int, mode: str, align_corners: bool) -> Patch:
    original = upstream.get_vision_interpolation_indices_and_weights
    indices, weights = original(
        grids.tensor(),
        num_grid_per_side=num_grid_per_side,
        mode=mode,
        align_corners=align_corners,
        spatial_merge_size=spatial_merge_size,
    )
    indices = indices.to(torch.int64)
    weights = weights.to(torch.float32)

    def get_vision_interpolation_indices_and_weights(grid_thw, num_grid_per_side, mode="bilinear", align_corners=False,
                                                     spatial_merge_size=1, padding="border", kwargs=None):
        if kwargs is not None:
            pi, pw = kwargs.pop("interp_indices", None), kwargs.pop("interp_weights", None)
            if pi is not None and pw is not None:
                return pi, pw
        grids.check(grid_thw, "get_vision_interpolation_indices_and_weights")
        return indices.to(grid_thw.device), weights.to(grid_thw.device)

    return Patch(
        TARGET,
        "get_vision_interpolation_indices_and_weights",
        get_vision_interpolation_indices_and_weights,
        reason=__doc__.split("\n\n")[1],
    )
