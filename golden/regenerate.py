"""Regenerate the golden PyTorch outputs of the embedded random model (``tiny-random``) kept in ``golden/`` and
used by tests (a repository script, not part of the installed package).

Layout: ``golden/vision/<bucket>/inputs.npz`` (``pixel_u8``: the processor-level uint8
values; pixel_values = (u8/255 - 0.5)/0.5), ``outputs.npz`` (``image_features``,
``deepstack_features``) and ``meta.json`` (versions, seed, dtype, regenerate command).

Tests never rewrite goldens. Regenerate explicitly with:

    python golden/regenerate.py --write golden
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from qwen3vl_compile.buckets import parse_bucket

GOLDEN_BUCKETS = ("224", "128x256")
GOLDEN_SEED = 7
REGENERATE = "python golden/regenerate.py --write golden"


def golden_inputs(bucket_name: str, seed: int = GOLDEN_SEED) -> np.ndarray:
    bucket = parse_bucket(bucket_name)
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(bucket.num_patches, bucket.patch_dim), dtype=np.uint8)


def compute(bucket_name: str, visual) -> dict[str, np.ndarray]:
    from qwen3vl_compile.bundle.goldens import pixel_values_from_u8
    from qwen3vl_compile.export.vision import reference_outputs

    bucket = parse_bucket(bucket_name)
    u8 = golden_inputs(bucket_name)
    ref = reference_outputs(visual, pixel_values_from_u8(u8), bucket.grid_thw)
    k = len([n for n in ref if n.startswith("deepstack_")])
    return {
        "image_features": ref["image_features"],
        "deepstack_features": np.stack([ref[f"deepstack_{i}"] for i in range(k)]),
    }


def write(root: Path) -> None:
    import importlib.metadata as md

    from qwen3vl_compile.model.checkpoint import Checkpoint, resolve_model_source
    from qwen3vl_compile.presets.materialize import TINY_SEED

    visual = Checkpoint.open(resolve_model_source("tiny-random")).load_vision_tower()
    for name in GOLDEN_BUCKETS:
        d = root / "vision" / name
        d.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(d / "inputs.npz", pixel_u8=golden_inputs(name))
        np.savez_compressed(d / "outputs.npz", **compute(name, visual))
        meta = {
            "model": "tiny-random",
            "model_seed": TINY_SEED,
            "input_seed": GOLDEN_SEED,
            "bucket": parse_bucket(name).to_json(),
            "dtype": "float32",
            "pixel_values": "(pixel_u8 / 255 - 0.5) / 0.5, float32",
            "reference": "unpatched transformers Qwen3VLVisionModel",
            "versions": {lib: md.version(lib) for lib in ("torch", "transformers", "numpy")},
            "regenerate": REGENERATE,
        }
        (d / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        print(f"wrote {d}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python golden/regenerate.py")
    p.add_argument("--write", type=Path, required=True, help="golden directory to (re)write")
    args = p.parse_args(argv)
    write(args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
