"""The any-size vision graphs: the image grid is a run-time input.

- ``vision_dynamic.onnx`` (``--buckets ...,dynamic``): **one image per call**, inputs
  ``pixel_values [num_patches, C*T*P*P]`` float32 and ``image_grid_thw [1, 3]`` int64.
  Attention takes no mask, so ONNX Runtime's attention kernel never materialises
  patches x patches scores: memory is quadratic in nothing, as in the PyTorch fallback
  (the runtime calls it once per image; several images cost several calls).
- ``vision_dynamic_multi.onnx`` (``--target ort-genai``, whose runtime sends every image of a
  prompt in one call): ``image_grid_thw [num_images, 3]``, images packed one after the other
  as the Hugging Face processor packs them, separated by a block-diagonal attention mask
  (``num_patches^2`` per head: for large images prefer the per-image graph).

Outputs ``image_features [num_patches/4, out_hidden]`` and
``deepstack_features [K, num_patches/4, out_hidden]``, as the bucket graphs.

Every grid-dependent tensor (position-table interpolation taps and weights, rotary
(row, col) ids, the block-diagonal attention mask between images) is computed inside the
graph from ``image_grid_thw`` and the row count (see ``qwen3vl_compile.patches``'s dynamic
set), so callers pass nothing but the processor's two arrays. Exported with torch.onnx
(dynamo) and named dynamic dimensions, cleaned by the vision pass list, verified against
the *unpatched* tower on grids that were not the export's example grids.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..bundle.goldens import pixel_values_from_u8
from ..bundle.records import GraphEntry, TensorInfo
from ..errors import ExportError
from ..parity import GraphParity
from ..runtime.vision import run_dynamic
from . import vision_common
from ..ort.session import ort_session
from .vision_common import OUTPUT_NAMES, export_graph, feature_outputs, measure_cases, reference_outputs

GRAPH_NAME = "vision_dynamic"
MULTI_GRAPH_NAME = "vision_dynamic_multi"
INPUT_NAMES = ["pixel_values", "image_grid_thw"]
# The graph interface, described once: axis names are the ONNX symbolic dimensions.
DYNAMIC_AXES = {"pixel_values": {0: "num_patches"}, "image_grid_thw": {0: "num_images"}}
PER_IMAGE_AXES = {"pixel_values": {0: "num_patches"}}  # image_grid_thw is [1, 3]
# Example inputs traced at export: non-square images of different sizes, so nothing
# specialises on h == w or on one size (nor, for the multi graph, on one image). Parity
# grids must differ from these.
EXPORT_GRIDS = ((1, 12, 10), (1, 4, 8))
# Parity grids (t, h, w) in patches, none of them seen at export; h and w are even.
PARITY_GRIDS = ((1, 8, 12), (1, 20, 14), (1, 16, 36), (1, 30, 30), (1, 6, 6))
MULTI_IMAGE = ((1, 8, 12), (1, 20, 14), (1, 6, 6))
# Other modules and tests read these from here.
__all__ = [
    "GRAPH_NAME", "MULTI_GRAPH_NAME", "INPUT_NAMES", "OUTPUT_NAMES", "DYNAMIC_AXES", "PER_IMAGE_AXES", "EXPORT_GRIDS",
    "PARITY_GRIDS", "MULTI_IMAGE", "random_pixel_u8", "export_vision_dynamic", "reference_outputs", "case_name",
    "verify_vision_dynamic",
]


def random_pixel_u8(grids, patch_dim: int, seed: int) -> np.ndarray:
    return vision_common.random_pixel_u8(sum(t * h * w for t, h, w in grids), patch_dim, seed)


def _dynamic_module(visual):
    import torch

    class VisionDynamicModule(torch.nn.Module):
        """The vision tower with its grid as an input; DeepStack levels stacked on axis 0."""

        def __init__(self):
            super().__init__()
            self.visual = visual

        def forward(self, pixel_values, image_grid_thw):
            out = self.visual(pixel_values, grid_thw=image_grid_thw)
            return out.pooler_output, torch.stack(list(out.deepstack_features), dim=0)

    return VisionDynamicModule().eval()


def _axes(per_image: bool) -> dict:
    return PER_IMAGE_AXES if per_image else DYNAMIC_AXES


def _dynamic_shapes(per_image: bool):
    from torch.export import Dim

    # num_patches is a multiple of 4 (2x2 merge); torch.export records that guard itself.
    dims = {"num_patches": Dim("num_patches", min=4), "num_images": Dim("num_images", min=1)}
    return {name: {axis: dims[label] for axis, label in _axes(per_image).get(name, {}).items()} or None
            for name in INPUT_NAMES}


def export_vision_dynamic(visual, out_dir: Path, *, per_image: bool = True, passes=None,
                          precision: str = "fp32") -> GraphEntry:
    """Export, run the vision passes, save ``vision_dynamic.onnx`` (one image per call) or,
    with ``per_image=False``, ``vision_dynamic_multi.onnx``; return its graph entry."""
    import torch

    from qwen3vl_compile.patches import vision_dynamic_export_patches

    name = GRAPH_NAME if per_image else MULTI_GRAPH_NAME
    grids = EXPORT_GRIDS[:1] if per_image else EXPORT_GRIDS
    patch_dim = visual.patch_embed.proj.weight[0].numel()
    example = (
        torch.from_numpy(pixel_values_from_u8(random_pixel_u8(grids, patch_dim, seed=0))),
        torch.tensor(grids, dtype=torch.int64),
    )
    return export_graph(
        _dynamic_module(visual),
        example,
        name=name,
        out_dir=out_dir,
        patches=vision_dynamic_export_patches(per_image),
        input_names=INPUT_NAMES,
        inputs=[
            TensorInfo("pixel_values", "float32", ("num_patches", patch_dim)),
            TensorInfo("image_grid_thw", "int64", (1 if per_image else "num_images", 3)),
        ],
        outputs=feature_outputs(len(visual.deepstack_visual_indexes), "num_patches/4", visual.config.out_hidden_size),
        details={"dynamic": True, "images_per_call": 1 if per_image else "any"},
        dynamic_shapes=_dynamic_shapes(per_image),
        export_facts={"example_grids": [list(g) for g in grids]},
        check=lambda model: _check_interface(model, name, per_image),
        passes=passes,
        precision=precision,
    )


def _check_interface(model, name: str = GRAPH_NAME, per_image: bool = True) -> None:
    """The exported inputs must keep their named dynamic axes: a graph that specialised on
    the example's sizes would run only on them."""
    for value in model.graph.inputs:
        for axis, label in _axes(per_image).get(value.name, {}).items():
            dim = value.shape[axis] if value.shape is not None else None
            if getattr(dim, "value", None) == label:  # an onnx_ir SymbolicDim with our name
                continue
            raise ExportError(f"{name}: input {value.name!r} axis {axis} is {dim!r}, expected the dynamic {label!r}")


def case_name(grids) -> str:
    sizes = "+".join(f"{h}x{w}" if t == 1 else f"{t}x{h}x{w}" for t, h, w in grids)
    return f"grid {sizes}" if len(grids) == 1 else f"{len(grids)} images {sizes}"


def verify_vision_dynamic(
    onnx_path: Path,
    visual,
    *,
    grids=PARITY_GRIDS,
    multi_image=MULTI_IMAGE,
    seed: int = 1,
    threads: int = 0,
    precision: str = "fp32",
) -> GraphParity:
    """Run ONNX Runtime and the unpatched tower on each grid in ``grids`` and on
    ``multi_image`` (Hugging Face: all images in one call; ours: one call, or with the
    per-image graph one call per image, concatenated); measure every output. The bundle's
    golden is the multi-image case (per-image graph: the first grid)."""
    session = ort_session(onnx_path, threads)
    per_image = session.get_inputs()[1].shape[0] == 1
    patch_dim = visual.patch_embed.proj.weight[0].numel()
    packings = [*([g] for g in grids), *([list(multi_image)] if multi_image else [])]
    cases = [
        (case_name(p), {"pixel_u8": random_pixel_u8(p, patch_dim, seed), "image_grid_thw": np.array(p, np.int64)}, p)
        for p in packings
    ]
    measured, golden = measure_cases(
        lambda x, inputs: run_dynamic(session, x, inputs["image_grid_thw"], per_image),
        visual,
        cases,
        golden=(cases[0] if per_image else cases[-1])[0] if cases else "",
        precision=precision,
    )
    how = "one call per image" if per_image else "one call per case"
    return GraphParity(
        graph=GRAPH_NAME if per_image else MULTI_GRAPH_NAME,
        kind="vision",
        precision=precision,
        reference=f"unpatched transformers Qwen3VLVisionModel, fp32, grids not seen at export ({how})",
        cases=measured,
        golden=golden,
    )
