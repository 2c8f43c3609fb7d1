"""Bucketed vision graphs: one static ONNX graph per image size.

Each graph takes ``pixel_values [h*w, C*T*P*P]`` for its bucket's grid and returns
``image_features [h*w/4, out_hidden]`` and ``deepstack_features [K, h*w/4, out_hidden]``.
The Hugging Face vision tower is exported with torch.onnx (dynamo) under the patches in
``qwen3vl_compile.patches``, then cleaned by the vision pass list and verified against the
*unpatched* tower.
"""

from __future__ import annotations

import contextlib
import io
import time
from pathlib import Path

import numpy as np

from ..buckets import VisionBucket
from ..bundle.goldens import pixel_values_from_u8
from ..bundle.records import GraphEntry
from ..errors import ExportError
from ..parity import TOLERANCES, GraphParity, measure

INPUT_NAMES = ["pixel_values"]
OUTPUT_NAMES = ["image_features", "deepstack_features"]
EXTERNAL_DATA_THRESHOLD = 256 << 20


@contextlib.contextmanager
def quiet_exporter(log: io.StringIO):
    """torch.onnx prints progress to stdout and warnings through logging: keep them in ``log``."""
    import logging
    import warnings

    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(log), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


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
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(bucket.num_patches, bucket.patch_dim), dtype=np.uint8)


def random_pixel_values(bucket: VisionBucket, seed: int) -> np.ndarray:
    """Inputs on the processor's grid of values: ((u8 / 255) - 0.5) / 0.5 for random u8."""
    return pixel_values_from_u8(random_pixel_u8(bucket, seed))


def export_vision_bucket(visual, bucket: VisionBucket, out_dir: Path, *, passes=None) -> dict:
    """Export, run the vision passes, save ``vision_<bucket>.onnx``; return a report dict.

    ``passes`` replaces the default pass list (benchmarks use it to measure variants)."""
    import onnx_ir as ir
    import torch

    from qwen3vl_compile.passes import vision_passes
    from qwen3vl_compile.passes.base import run_passes
    from qwen3vl_compile.patches import vision_export_patches

    name = graph_name(bucket)
    module = _bucket_module(visual, bucket.grid_thw)
    example = torch.from_numpy(random_pixel_values(bucket, seed=0))
    log = io.StringIO()
    t0 = time.perf_counter()
    try:
        with quiet_exporter(log), vision_export_patches(visual, [bucket.grid_thw]) as patch_names:
            program = torch.onnx.export(
                module,
                (example,),
                dynamo=True,
                input_names=INPUT_NAMES,
                output_names=OUTPUT_NAMES,
                optimize=True,
                verbose=False,
            )
    except Exception as e:  # noqa: BLE001 - typed, with the exporter's log tail
        tail = "\n".join(log.getvalue().strip().splitlines()[-5:])
        raise ExportError(f"{name}: torch.onnx.export failed: {type(e).__name__}: {e}\n{tail}") from e
    export_seconds = time.perf_counter() - t0
    model = program.model
    model.graph.name = name
    model, reports = run_passes(model, vision_passes() if passes is None else passes, graph=name)
    path = out_dir / f"{name}.onnx"
    size = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    data_files = []
    if size > EXTERNAL_DATA_THRESHOLD:
        ir.save(model, path, external_data=f"{name}.onnx.data")
        data_files.append(f"{name}.onnx.data")
    else:
        ir.save(model, path)
    return GraphEntry.from_json({
        "file": path.name,
        "data_files": data_files,
        "kind": "vision",
        "precision": "fp32",
        "bucket": bucket.to_json(),
        "inputs": [{"name": "pixel_values", "dtype": "float32", "shape": [bucket.num_patches, bucket.patch_dim]}],
        "outputs": [
            {"name": "image_features", "dtype": "float32", "shape": [bucket.num_tokens, visual.config.out_hidden_size]},
            {
                "name": "deepstack_features",
                "dtype": "float32",
                "shape": [len(visual.deepstack_visual_indexes), bucket.num_tokens, visual.config.out_hidden_size],
            },
        ],
        "export": {"exporter": f"torch.onnx.export(dynamo=True) torch {torch.__version__}", "seconds": round(export_seconds, 2)},
        "patches": patch_names,
        "passes": [r.to_json() for r in reports],
    })


def reference_outputs(visual, pixel_values: np.ndarray, grid_thw) -> dict[str, np.ndarray]:
    """The unpatched Hugging Face vision tower, fp32, on one image."""
    import torch

    with torch.no_grad():
        out = visual(torch.from_numpy(pixel_values), grid_thw=torch.tensor([list(grid_thw)], dtype=torch.int64))
    result = {"image_features": out.pooler_output.numpy()}
    for k, feat in enumerate(out.deepstack_features):
        result[f"deepstack_{k}"] = feat.numpy()
    return result


def split_outputs(image_features: np.ndarray, deepstack: np.ndarray) -> dict[str, np.ndarray]:
    out = {"image_features": image_features}
    for k in range(deepstack.shape[0]):
        out[f"deepstack_{k}"] = deepstack[k]
    return out


def verify_vision_bucket(
    onnx_path: Path, visual, bucket: VisionBucket, *, seeds=(1, 2), threads: int = 0, reference_grid=None
) -> GraphParity:
    """Run ONNX Runtime and the unpatched tower on random inputs; measure every output.

    ``reference_grid`` lets a test feed the reference a different layout of the same number
    of patches (a graph for 14x14 checked against 7x28 must fail).
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    tol = TOLERANCES[("vision", "fp32")]
    grid = tuple(reference_grid or bucket.grid_thw)
    cases = {}
    for seed in seeds:
        x = random_pixel_values(bucket, seed)
        feats, deep = session.run(OUTPUT_NAMES, {"pixel_values": x})
        actual = split_outputs(feats, deep)
        ref = reference_outputs(visual, x, grid)
        cases[f"seed{seed}"] = [measure(k, actual.get(k), ref[k], tol) for k in ref]
    ref = reference_outputs(visual, random_pixel_values(bucket, seeds[0]), grid)
    golden = {
        "pixel_u8": random_pixel_u8(bucket, seeds[0]),
        "image_features": ref["image_features"],
        "deepstack_features": np.stack([ref[k] for k in sorted(ref) if k.startswith("deepstack_")]),
    }
    return GraphParity(
        graph=graph_name(bucket),
        kind="vision",
        precision="fp32",
        reference=f"unpatched transformers Qwen3VLVisionModel, fp32, grid {list(grid)}",
        cases=cases,
        golden=golden,
    )
