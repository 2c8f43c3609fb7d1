"""Per-patch grid coordinates computed from ``grid_thw`` and the number of patches with
fixed-rank tensor ops only, so that the exported graph takes its grid at run time.

Upstream (``transformers.vision_utils``) expands per-image values to per-patch values with
``repeat_interleave(values, counts)`` and loops over ``grid_thw.tolist()``: the output
length is then a data-dependent (unbacked) symbol that torch.export cannot relate to the
number of rows of ``pixel_values``. Here the per-patch length is that row count ``N``
itself, and each patch finds its image by comparing its index with the cumulative patch
counts (``[N, num_images]`` comparisons, then a sum), so every shape is ``N``,
``num_images`` or a constant::

    index      0 1 2 ... 95 | 96 97 ... 155       (two images, 96 and 60 patches)
    image      0 0 0 ...  0 |  1  1 ...   1       = sum(index >= cumulative ends)
    offset     0 1 2 ... 95 |  0  1 ...  59       = index - start[image]
    within     offset % (h * w)                   (position inside one frame)
    row, col   decoded from ``within`` in merge-block order, as upstream does

``frame_start`` (the index of the first patch of the patch's frame) is unique per
attention segment (one per image and frame), so two patches attend to each other exactly
when their ``frame_start`` agree (the segment ids of
``vision_attention.block_diagonal_mask``).
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class PatchCoordinates:
    """Per-patch int64 tensors, all of length ``N`` (patches packed image after image)."""

    row: torch.Tensor
    col: torch.Tensor
    height: torch.Tensor  # the patch's image height in patches
    width: torch.Tensor
    frame_start: torch.Tensor  # first packed index of the patch's frame: the segment id


def patch_coordinates(grid_thw: torch.Tensor, num_patches, merge: int) -> PatchCoordinates:
    """Coordinates of every packed patch; ``num_patches`` may be a symbolic size.

    Patches are in merge-block order (block_row, block_col, in_row, in_col), the order the
    Hugging Face image processor emits and ``transformers.vision_utils`` decodes.
    """
    grid = grid_thw.to(torch.int64)
    t, h, w = grid[:, 0], grid[:, 1], grid[:, 2]
    counts = t * h * w
    ends = counts.cumsum(0)
    starts = ends - counts
    index = torch.arange(num_patches, dtype=torch.int64, device=grid.device)
    # The image of each patch: how many images end at or before it. A grid that does not
    # add up to N gives an image index past the end and the gathers below fail loudly.
    image = (index[:, None] >= ends[None, :]).sum(-1)
    height, width = h[image], w[image]
    within = (index - starts[image]) % (height * width)
    blocks_w = width // merge
    in_col = within % merge
    in_row = (within // merge) % merge
    block_col = (within // (merge * merge)) % blocks_w
    block_row = within // (merge * merge * blocks_w)
    return PatchCoordinates(
        row=block_row * merge + in_row,
        col=block_col * merge + in_col,
        height=height,
        width=width,
        frame_start=index - within,
    )
