"""Golden PyTorch outputs (golden/vision/<bucket>) against the live model and the ONNX graphs:
upstream drift in transformers, or in how the tiny model is built, shows up here."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from qwen3vl_compile.bundle.goldens import pixel_values_from_u8
from qwen3vl_compile.export.vision import OUTPUT_NAMES

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "golden" / "vision"


def _regenerate_module():
    """golden/regenerate.py is a repository script, outside the package's import path."""
    spec = importlib.util.spec_from_file_location("golden_regenerate", ROOT / "golden" / "regenerate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_regen = _regenerate_module()
GOLDEN_BUCKETS, compute = _regen.GOLDEN_BUCKETS, _regen.compute


def _load(bucket):
    d = GOLDEN / bucket
    return np.load(d / "inputs.npz")["pixel_u8"], dict(np.load(d / "outputs.npz")), json.loads((d / "meta.json").read_text())


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("bucket", GOLDEN_BUCKETS)
def test_live_pytorch_matches_golden(tiny_visual, bucket):
    _, golden, meta = _load(bucket)
    # The recorded command names the script that exists in the repository today.
    assert (ROOT / meta["regenerate"].split()[1]).is_file(), meta["regenerate"]
    assert meta["bucket"]["name"] == bucket
    live = compute(bucket, tiny_visual)
    for k in ("image_features", "deepstack_features"):
        assert _rel(live[k], golden[k]) < 1e-5, k


# 224 is exported once per session for several modules; other buckets are exports of their own.
@pytest.mark.parametrize("bucket", [b if b == "224" else pytest.param(b, marks=pytest.mark.slow) for b in GOLDEN_BUCKETS])
def test_onnx_matches_golden(vision_graphs, bucket):
    import onnxruntime as ort

    u8, golden, _ = _load(bucket)
    path, _, _ = vision_graphs(bucket)
    got = ort.InferenceSession(str(path)).run(OUTPUT_NAMES, {"pixel_values": pixel_values_from_u8(u8)})
    for k, v in zip(OUTPUT_NAMES, got):
        assert _rel(v, golden[k]) < 1e-4, k
