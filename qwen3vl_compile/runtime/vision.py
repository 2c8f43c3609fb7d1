"""Serving images: the bucket whose grid equals the image's processed grid runs its ONNX
graph; other sizes follow the ``on_miss`` policy:

- ``fallback`` (default): the Hugging Face vision tower in PyTorch eager, built from the
  weights the bundle carries (``vision_fallback.safetensors`` + ``config.json``); torch and
  transformers are imported only then.
- ``fit``: the caller resizes the image to the nearest bucket's size first (see
  :func:`nearest_bucket`) and says so in its output.
- ``error``: refuse, listing the buckets.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np

from ..errors import BundleError, RuntimeInputError

ON_MISS = ("fallback", "fit", "error")


@dataclasses.dataclass(frozen=True)
class BucketGraph:
    name: str
    height: int
    width: int
    grid_thw: tuple[int, int, int]
    file: str


@dataclasses.dataclass
class VisionResult:
    image_features: np.ndarray  # [tokens, H]
    deepstack: np.ndarray  # [K, tokens, H]
    served_by: str  # "bucket 448", "fallback (PyTorch)", ...
    seconds: float


def buckets_from_manifest(manifest: dict) -> list[BucketGraph]:
    return [
        BucketGraph(b["name"], b["height"], b["width"], tuple(b["grid_thw"]), b["graph"]) for b in manifest.get("buckets", [])
    ]


def nearest_bucket(buckets: list[BucketGraph], height: int, width: int) -> BucketGraph:
    """The bucket closest to the image in log-scale height and width (aspect first, then size)."""
    if not buckets:
        raise RuntimeInputError("this bundle has no vision buckets to fit images to")

    def cost(b: BucketGraph) -> tuple[float, float]:
        aspect = abs(math.log((b.height / b.width) / (height / width)))
        size = abs(math.log((b.height * b.width) / (height * width)))
        return (round(aspect, 6), size)

    return min(buckets, key=cost)


class VisionEncoder:
    def __init__(self, root: Path, manifest: dict, session_factory, *, on_miss: str = "fallback"):
        if on_miss not in ON_MISS:
            raise RuntimeInputError(f"--on-miss {on_miss!r}: choose one of {', '.join(ON_MISS)}")
        self.root = Path(root)
        self.manifest = manifest
        self.on_miss = on_miss
        self.buckets = buckets_from_manifest(manifest)
        self._by_grid = {b.grid_thw: b for b in self.buckets}
        self._session_factory = session_factory
        self._sessions: dict[str, object] = {}
        self._fallback = None

    def bucket_for_grid(self, grid_thw) -> BucketGraph | None:
        return self._by_grid.get(tuple(int(v) for v in grid_thw))

    def describe_buckets(self) -> str:
        return ", ".join(f"{b.name} (grid {b.grid_thw[1]}x{b.grid_thw[2]})" for b in self.buckets) or "none"

    def encode(self, pixel_values: np.ndarray, grid_thw) -> VisionResult:
        import time

        t = time.perf_counter()
        bucket = self.bucket_for_grid(grid_thw)
        if bucket is not None:
            if bucket.file not in self._sessions:
                self._sessions[bucket.file] = self._session_factory(self.root / bucket.file)
            feats, deep = self._sessions[bucket.file].run(
                ["image_features", "deepstack_features"], {"pixel_values": pixel_values}
            )
            return VisionResult(feats, deep, f"bucket {bucket.name}", time.perf_counter() - t)
        if self.on_miss == "error":
            raise RuntimeInputError(
                f"image grid {list(grid_thw)} has no bucket (buckets: {self.describe_buckets()}); "
                "use --on-miss fallback or fit"
            )
        feats, deep = self._fallback_model().run(pixel_values, grid_thw)
        return VisionResult(feats, deep, "fallback (PyTorch eager)", time.perf_counter() - t)

    def _fallback_model(self):
        if self._fallback is None:
            info = self.manifest.get("fallback")
            if not info:
                raise BundleError(f"{self.root}: the bundle carries no fallback vision weights")
            from .fallback import FallbackVision

            self._fallback = FallbackVision(self.root / "config.json", self.root / info["file"])
        return self._fallback
