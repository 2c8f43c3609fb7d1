"""Patch ``Qwen3VLVisionModel.forward``: compute the grid-dependent tensors from
``grid_thw`` and the number of patches inside the graph (for the any-size vision graph).

Why export fails without it: upstream's forward builds the position-table interpolation
taps and weights, the rotary (row, col) ids and the attention segments with
``repeat_interleave`` over ``grid_thw`` values, ``grid_thw.tolist()`` loops and
``torch.arange(h)``; with a grid that is an input of the graph these sizes are unbacked
data-dependent symbols (``GuardOnDataDependentSymNode``) that torch.export cannot relate to
the rows of ``pixel_values``, and TorchScript bakes the traced grid. We compute the same
tensors per patch with fixed-rank ops whose length is the row count (see
``patches.dynamic_grid``), reusing upstream's own per-axis tap/weight helper so the values
are Hugging Face's, and hand them to the unchanged upstream forward through its
precomputed-kwargs hooks (``interp_indices``, ``interp_weights``, ``position_ids``,
``cu_seqlens``). The ``cu_seqlens`` slot carries the additive block-diagonal attention mask
``[1, 1, N, N]`` built once per call; only the attention patch (``mask="given"``) reads it.
In the per-image variant (one image per call, one attention segment) no mask is built: the
slot carries an empty tensor and the attention patch (``mask="none"``) runs unmasked.
"""

from __future__ import annotations

import torch
from transformers import vision_utils
from transformers.models.qwen3_vl import modeling_qwen3_vl as upstream
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

from qwen3vl_compile.errors import PatchError
from qwen3vl_compile.upstream import TESTED

from .base import Patch
from .dynamic_grid import PatchCoordinates, patch_coordinates
from .vision_attention import block_diagonal_mask

TARGET = Qwen3VLVisionModel
VERSIONS = f"transformers{TESTED['transformers']} (vision_utils._interpolation_axis_taps_weights)"


def interpolation_taps(coords: PatchCoordinates, side: int, mode: str, align_corners: bool):
    """Gather indices into the flattened ``side x side`` position table and their weights,
    ``[N, taps]``, composed from upstream's per-axis helper exactly as
    ``get_vision_interpolation_indices_and_weights`` composes them."""
    axis = vision_utils._interpolation_axis_taps_weights
    h_taps, h_weights = axis(coords.row, coords.height, side, mode, align_corners, "border")
    w_taps, w_weights = axis(coords.col, coords.width, side, mode, align_corners, "border")
    n = h_taps.shape[1]
    indices = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, n * n)
    weights = (h_weights[:, :, None] * w_weights[:, None, :]).reshape(-1, n * n)
    return indices, weights


def grid_kwargs(visual, num_patches, grid_thw: torch.Tensor, per_image: bool = False) -> dict:
    """The precomputed tensors upstream's forward accepts, for ``grid_thw`` at run time."""
    coords = patch_coordinates(grid_thw, num_patches, visual.spatial_merge_size)
    indices, weights = interpolation_taps(
        coords, visual.num_grid_per_side, visual.interpolation_mode, visual.interpolation_align_corners
    )
    dtype = visual.patch_embed.proj.weight.dtype
    return {
        "interp_indices": indices,
        "interp_weights": weights,
        "position_ids": torch.stack([coords.row, coords.col], dim=-1),
        "cu_seqlens": torch.zeros(0, dtype=dtype) if per_image else block_diagonal_mask(coords.frame_start, dtype),
    }


def make_patch(per_image: bool = False) -> Patch:
    if not hasattr(vision_utils, "_interpolation_axis_taps_weights"):
        raise PatchError(f"transformers.vision_utils has no _interpolation_axis_taps_weights ({VERSIONS}); cannot patch")
    original = Qwen3VLVisionModel.forward

    def forward(self, hidden_states, grid_thw, **kwargs):
        if upstream.is_flash_attention_requested(self.config):
            raise PatchError("the dynamic vision patches export the SDPA path; flash attention was requested")
        kwargs.update(grid_kwargs(self, hidden_states.shape[0], grid_thw, per_image))
        return original(self, hidden_states, grid_thw, **kwargs)

    return Patch(TARGET, "forward", forward, reason=__doc__.split("\n\n")[1], versions=VERSIONS)
