"""Bucketed vision graphs: one static ONNX graph per image size.

Each graph takes ``pixel_values [h*w, C*T*P*P]`` for its bucket's grid and returns
``image_features [h*w/4, out_hidden]`` and ``deepstack_features [K, h*w/4, out_hidden]``.
The Hugging Face vision tower is exported with torch.onnx (dynamo) under the patches in
``qwen3vl_compile.patches``, then cleaned by the vision pass list and verified against the
*unpatched* tower (the export path and the reference are ``vision_common``'s, shared with
the any-size graphs).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..buckets import VisionBucket
from ..bundle.goldens import pixel_values_from_u8
from ..bundle.records import GraphEntry, TensorInfo
from ..parity import GraphParity
from . import vision_common
from ..ort.session import ort_session
from .vision_common import OUTPUT_NAMES, export_graph, feature_outputs, measure_cases, reference_outputs

INPUT_NAMES = ["pixel_values"]
# Other modules and tests read these from here.
__all__ = [
    "INPUT_NAMES", "OUTPUT_NAMES", "graph_name", "random_pixel_u8", "random_pixel_values", "export_vision_bucket",
    "reference_outputs", "verify_vision_bucket",
]


def graph_name(bucket: VisionBucket) -> str:
    return f"vision_{bucket.name}"


def _bucket_module(visual, grid_thw):
    import torch

    class VisionBucketModule(torch.nn.Module):
        """The vision tower specialised to one grid; DeepStack levels stacked on axis 0."""

        def __init__(self):
            super().__init__()
            self.visual = visual
            self.grid = [list(grid_thw)]

        def forward(self, pixel_values):
            out = self.visual(pixel_values, grid_thw=torch.tensor(self.grid, dtype=torch.int64))
            return out.pooler_output, torch.stack(list(out.deepstack_features), dim=0)

    return VisionBucketModule().eval()


def random_pixel_u8(bucket: VisionBucket, seed: int) -> np.ndarray:
    return vision_common.random_pixel_u8(bucket.num_patches, bucket.patch_dim, seed)


def random_pixel_values(bucket: VisionBucket, seed: int) -> np.ndarray:
    """Inputs on the processor's grid of values: ((u8 / 255) - 0.5) / 0.5 for random u8."""
    return pixel_values_from_u8(random_pixel_u8(bucket, seed))


def export_vision_bucket(visual, bucket: VisionBucket, out_dir: Path, *, passes=None, precision: str = "fp32") -> GraphEntry:
    """Export, run the vision passes for ``precision``, save ``vision_<bucket>.onnx``; return
    its graph entry.

    ``passes`` replaces the default pass list (benchmarks use it to measure variants)."""
    import torch

    from qwen3vl_compile.patches import vision_export_patches

    return export_graph(
        _bucket_module(visual, bucket.grid_thw),
        (torch.from_numpy(random_pixel_values(bucket, seed=0)),),
        name=graph_name(bucket),
        out_dir=out_dir,
        patches=vision_export_patches(visual, [bucket.grid_thw]),
        input_names=INPUT_NAMES,
        inputs=[TensorInfo("pixel_values", "float32", (bucket.num_patches, bucket.patch_dim))],
        outputs=feature_outputs(len(visual.deepstack_visual_indexes), bucket.num_tokens, visual.config.out_hidden_size),
        details={"bucket": bucket.to_json()},
        passes=passes,
        precision=precision,
    )


def verify_vision_bucket(
    onnx_path: Path, visual, bucket: VisionBucket, *, seeds=(1, 2), threads: int = 0, reference_grid=None,
    precision: str = "fp32",
) -> GraphParity:
    """Run ONNX Runtime and the unpatched tower on random inputs; measure every output. The
    golden is the first seed's case. ``precision`` (the graph's) picks the gate.

    ``reference_grid`` lets a test feed the reference a different layout of the same number
    of patches (a graph for 14x14 checked against 7x28 must fail).
    """
    session = ort_session(onnx_path, threads)
    grid = tuple(reference_grid or bucket.grid_thw)
    cases, golden = measure_cases(
        lambda x, _inputs: session.run(OUTPUT_NAMES, {"pixel_values": x}),
        visual,
        [(f"seed{seed}", {"pixel_u8": random_pixel_u8(bucket, seed)}, grid) for seed in seeds],
        golden=f"seed{seeds[0]}",
        precision=precision,
    )
    return GraphParity(
        graph=graph_name(bucket),
        kind="vision",
        precision=precision,
        reference=f"unpatched transformers Qwen3VLVisionModel, fp32, grid {list(grid)}",
        cases=cases,
        golden=golden,
    )
