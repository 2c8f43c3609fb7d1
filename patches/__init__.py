"""Reversible PyTorch patches of the Hugging Face Qwen3-VL vision code, applied only while
exporting (one file per upstream target; each file's docstring says why export fails
without it). A target patched differently for the bucket and the any-size graphs has one
patch, parametrised (``vision_attention.make_patch(mask=...)``).

    with vision_export_patches(visual, grids=[(1, 28, 28)]) as applied:
        torch.onnx.export(...)

    with vision_dynamic_export_patches() as applied:   # grid as a graph input
        torch.onnx.export(..., dynamic_shapes=...)
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

from .base import Patch, apply_patches
from .grids import PatchedGrids


def vision_patches(visual, grids: Sequence[Sequence[int]]) -> list[Patch]:
    """The patches that make ``visual`` (a ``Qwen3VLVisionModel``) exportable for ``grids``."""
    from . import vision_attention, vision_attention_seqlens, vision_pos_embed, vision_position_ids, vision_rotary

    g = PatchedGrids.of(grids)
    merge = visual.spatial_merge_size
    return [
        vision_rotary.make_patch(max_positions=g.max_side),
        vision_position_ids.make_patch(g, merge),
        vision_pos_embed.make_patch(
            g, visual.num_grid_per_side, merge, visual.interpolation_mode, visual.interpolation_align_corners
        ),
        vision_attention_seqlens.make_patch(g),
        vision_attention.make_patch(),
    ]


def vision_dynamic_patches(per_image: bool = False) -> list[Patch]:
    """The patches that make the vision tower exportable with its grid as a graph input
    (the any-size graph): grid tensors computed in the graph, one attention call. With
    ``per_image`` the graph serves one image per call and attention takes no mask (ONNX
    Runtime then runs it without materialising patches x patches scores); otherwise a
    block-diagonal mask separates the images of one call. The rotary embedding is
    upstream's own (it takes the position ids as a tensor)."""
    from . import vision_attention, vision_forward_dynamic

    return [
        vision_forward_dynamic.make_patch(per_image=per_image),
        vision_attention.make_patch(mask="none" if per_image else "given"),
    ]


@contextlib.contextmanager
def vision_export_patches(visual, grids: Sequence[Sequence[int]]) -> Iterator[list[str]]:
    with apply_patches(vision_patches(visual, grids)) as names:
        yield names


@contextlib.contextmanager
def vision_dynamic_export_patches(per_image: bool = False) -> Iterator[list[str]]:
    with apply_patches(vision_dynamic_patches(per_image)) as names:
        yield names


__all__ = [
    "Patch",
    "PatchedGrids",
    "apply_patches",
    "vision_patches",
    "vision_export_patches",
    "vision_dynamic_patches",
    "vision_dynamic_export_patches",
]
