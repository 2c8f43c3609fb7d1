"""Serving images: the bucket whose grid equals the image's processed grid runs its ONNX
graph; other sizes follow the ``on_miss`` policy:

- ``fallback`` (default): the any-size graph ``vision_dynamic`` when the bundle has one
  (compiled with ``--buckets ...,dynamic``; ONNX Runtime, grid passed as
  ``image_grid_thw``, one call per image so that memory is linear in the number of images
  and attention never materialises patches x patches scores); otherwise the Hugging Face vision tower in PyTorch eager, built from
  the weights the bundle carries (``vision_fallback.safetensors`` + ``config.json``); torch
  and transformers are imported only then.
- ``fit``: the caller resizes the image to the nearest bucket's size first (see
  :func:`nearest_bucket`) and says so in its output.
- ``error``: refuse, listing the buckets.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import math
import threading
from pathlib import Path

import numpy as np

from ..bundle.records import BundleManifest
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
    # What the features are of (FeatureCache.key of the pixels and grid; for a video, of its
    # groups' keys): names the media in the prompt's prefix key. Empty: unknown.
    content_key: bytes = b""


def buckets_from_manifest(manifest: BundleManifest | dict) -> list[BucketGraph]:
    return [BucketGraph(b.name, b.height, b.width, b.grid_thw, b.graph) for b in BundleManifest.of(manifest).buckets]


def dynamic_graph_from_manifest(manifest: BundleManifest | dict) -> tuple[str, bool] | None:
    """The bundle's any-size vision graph: (file, one image per call), or None. The
    per-image graph is preferred (its memory does not grow with patches^2)."""
    found = [(g.file, g.images_per_call == 1) for g in BundleManifest.of(manifest).graphs.values()
             # genai_vision.onnx is dynamic too, but packs DeepStack for onnxruntime-genai.
             if g.kind == "vision" and g.dynamic and not g.deepstack_packing]
    return max(found, key=lambda f: f[1]) if found else None


def temporal_groups(grid_thw: np.ndarray) -> np.ndarray:
    """Each ``(t, h, w)`` row as ``t`` rows ``(1, h, w)``. The vision tower attends within a
    temporal group only, with the same rotary ids and position embeddings for every group,
    and the processor packs a group's ``h * w`` patches contiguously: a grid of ``t`` groups
    is ``t`` images of grid ``(1, h, w)``, whose two temporal slices are two frames."""
    grid_thw = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
    return np.concatenate([np.repeat([[1, h, w]], t, axis=0) for t, h, w in grid_thw]).astype(np.int64)


def run_dynamic(session, pixel_values: np.ndarray, grid_thw: np.ndarray, per_image: bool):
    """``(image_features, deepstack_features)`` from an any-size vision graph for images
    packed in ``pixel_values``: one call, or with a per-image graph one call per temporal
    group, outputs concatenated in order. A grid with ``t > 1`` is split into its temporal
    groups first (see :func:`temporal_groups`): an any-size graph never sees several groups
    as one segment (the per-image graph's attention has no mask)."""
    names = ["image_features", "deepstack_features"]
    grid_thw = temporal_groups(grid_thw)
    if not per_image:
        return session.run(names, {"pixel_values": pixel_values, "image_grid_thw": grid_thw})
    feats, deep, start = [], [], 0
    for thw in grid_thw:
        n = int(np.prod(thw))
        f, d = session.run(names, {"pixel_values": pixel_values[start:start + n], "image_grid_thw": thw[None]})
        feats.append(f)
        deep.append(d)
        start += n
    return np.concatenate(feats), np.concatenate(deep, axis=1)


def check_grids(pixel_values: np.ndarray, grid_thw: np.ndarray, merge: int) -> None:
    """Host-side checks before the any-size graph runs: it cannot tell a grid that does not
    describe ``pixel_values`` (it would give wrong features, not an error)."""
    if grid_thw.ndim != 2 or grid_thw.shape[1] != 3 or grid_thw.shape[0] == 0:
        raise RuntimeInputError(f"image_grid_thw must be [num_images, 3], got shape {list(grid_thw.shape)}")
    if (grid_thw <= 0).any() or (grid_thw[:, 1:] % merge).any():
        raise RuntimeInputError(
            f"image_grid_thw {grid_thw.tolist()}: t, h, w must be positive and h, w multiples of {merge}"
        )
    total = int(np.prod(grid_thw, axis=1).sum())
    if pixel_values.ndim != 2 or pixel_values.shape[0] != total:
        raise RuntimeInputError(
            f"pixel_values has shape {list(pixel_values.shape)} but image_grid_thw {grid_thw.tolist()} "
            f"describes {total} patches"
        )


def nearest_bucket(buckets: list[BucketGraph], height: int, width: int) -> BucketGraph:
    """The bucket closest to the image in log-scale height and width (aspect first, then size)."""
    if not buckets:
        raise RuntimeInputError("this bundle has no vision buckets to fit images to")

    def cost(b: BucketGraph) -> tuple[float, float]:
        aspect = abs(math.log((b.height / b.width) / (height / width)))
        size = abs(math.log((b.height * b.width) / (height * width)))
        return (round(aspect, 6), size)

    return min(buckets, key=cost)


class FeatureCache:
    """Vision features by image content: a hash of the preprocessed pixels and the grid ->
    ``(image_features, deepstack, served_by)``, least recently used dropped first once the
    entries' arrays pass ``max_bytes``. Thread-safe; the cached arrays are read-only."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._entries: collections.OrderedDict[bytes, tuple] = collections.OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(pixel_values: np.ndarray, grid_thw) -> bytes:
        h = hashlib.blake2b(digest_size=20)
        h.update(np.asarray([int(v) for v in grid_thw], np.int64).tobytes())
        pixels = np.ascontiguousarray(pixel_values)
        h.update(str((pixels.dtype.str, pixels.shape)).encode())
        h.update(memoryview(pixels).cast("B"))
        return h.digest()

    def get(self, key: bytes):
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry

    def put(self, key: bytes, feats: np.ndarray, deep: np.ndarray, served_by: str) -> None:
        size = feats.nbytes + deep.nbytes
        if size > self.max_bytes:
            return
        feats, deep = feats.copy(), deep.copy()
        feats.flags.writeable = deep.flags.writeable = False
        with self._lock:
            if key in self._entries:
                return
            self._entries[key] = (feats, deep, served_by)
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, (f, d, _) = self._entries.popitem(last=False)
                self.bytes -= f.nbytes + d.nbytes

    def __len__(self) -> int:
        return len(self._entries)


class VisionEncoder:
    def __init__(self, root, manifest: BundleManifest | dict, session_factory, *, on_miss: str = "fallback",
                 cache_bytes: int = 0):
        """``root``: the bundle directory or its BundleFiles; graphs and fallback weights are
        opened only when the manifest (typed or as read) lists them. ``cache_bytes`` > 0:
        :meth:`encode` keeps features of that many bytes by image content (see
        :class:`FeatureCache`)."""
        from ..bundle.manifest import BundleFiles

        if on_miss not in ON_MISS:
            raise RuntimeInputError(f"--on-miss {on_miss!r}: choose one of {', '.join(ON_MISS)}")
        manifest = BundleManifest.of(manifest)
        self.files = root if isinstance(root, BundleFiles) else BundleFiles.of_manifest(Path(root), manifest.json)
        self.root = self.files.root
        self.manifest = manifest
        self.on_miss = on_miss
        self.buckets = buckets_from_manifest(manifest)
        self._by_grid = {b.grid_thw: b for b in self.buckets}
        self._session_factory = session_factory
        self._sessions: dict[str, object] = {}
        self._fallback = None
        self.dynamic_file, self.dynamic_per_image = dynamic_graph_from_manifest(manifest) or (None, False)
        self.merge = int(manifest.processor.get("merge_size", 2))
        self.cache = FeatureCache(cache_bytes) if cache_bytes > 0 else None

    def bucket_for_grid(self, grid_thw) -> BucketGraph | None:
        return self._by_grid.get(tuple(int(v) for v in grid_thw))

    def describe_buckets(self) -> str:
        return ", ".join(f"{b.name} (grid {b.grid_thw[1]}x{b.grid_thw[2]})" for b in self.buckets) or "none"

    def encode(self, pixel_values: np.ndarray, grid_thw) -> VisionResult:
        """Features of one image; from the cache when the same pixels and grid were encoded
        before (``served_by`` then ends in "(cached)"). The result carries the content key."""
        import time

        t = time.perf_counter()
        key = FeatureCache.key(pixel_values, grid_thw)
        hit = self.cache.get(key) if self.cache is not None else None
        if hit is not None:
            feats, deep, served_by = hit
            return VisionResult(feats, deep, f"{served_by} (cached)", time.perf_counter() - t, key)
        result = self._encode(pixel_values, grid_thw)
        result.content_key = key
        if self.cache is not None:
            self.cache.put(key, result.image_features, result.deepstack, result.served_by)
        return result

    def encode_video(self, pixel_values: np.ndarray, grid_thw) -> VisionResult:
        """Features of one video of grid ``(t, h, w)``: each temporal group is encoded as an
        image of grid ``(1, h, w)`` (see :func:`temporal_groups`), by its bucket, the any-size
        graph or the fallback, and through the cache (a group seen before is not run again);
        rows concatenated in group order."""
        t, h, w = (int(v) for v in grid_thw)
        n = h * w
        if pixel_values.shape[0] != t * n:
            raise RuntimeInputError(f"video pixel_values has {pixel_values.shape[0]} rows but grid {[t, h, w]} "
                                    f"describes {t * n} patches")
        parts = [self.encode(pixel_values[i * n:(i + 1) * n], (1, h, w)) for i in range(t)]
        served = sorted({r.served_by for r in parts})
        return VisionResult(np.concatenate([r.image_features for r in parts]),
                            np.concatenate([r.deepstack for r in parts], axis=1),
                            f"{', '.join(served)} ({t} groups)", sum(r.seconds for r in parts),
                            hashlib.blake2b(b"".join(r.content_key for r in parts), digest_size=20).digest())

    def _encode(self, pixel_values: np.ndarray, grid_thw) -> VisionResult:
        import time

        t = time.perf_counter()
        bucket = self.bucket_for_grid(grid_thw)
        if bucket is not None:
            feats, deep = self._session(bucket.file).run(
                ["image_features", "deepstack_features"], {"pixel_values": pixel_values}
            )
            return VisionResult(feats, deep, f"bucket {bucket.name}", time.perf_counter() - t)
        if self.on_miss == "error":
            raise RuntimeInputError(
                f"image grid {list(grid_thw)} has no bucket (buckets: {self.describe_buckets()}); "
                "use --on-miss fallback or fit"
            )
        if self.dynamic_file is not None:
            return self.encode_dynamic(pixel_values, [grid_thw])
        feats, deep = self._fallback_model().run(pixel_values, grid_thw)
        return VisionResult(feats, deep, "fallback (PyTorch eager)", time.perf_counter() - t)

    def encode_dynamic(self, pixel_values: np.ndarray, grids) -> VisionResult:
        """Several images (packed as the processor packs them) in one call of the any-size
        graph; features come back packed in the same order."""
        import time

        if self.dynamic_file is None:
            raise BundleError(f"{self.root}: the bundle has no any-size vision graph (compile with --buckets ...,dynamic)")
        t = time.perf_counter()
        grid_thw = np.asarray(grids, dtype=np.int64).reshape(-1, 3)
        check_grids(pixel_values, grid_thw, self.merge)
        feats, deep = run_dynamic(self._session(self.dynamic_file), np.ascontiguousarray(pixel_values, dtype=np.float32),
                                  grid_thw, self.dynamic_per_image)
        return VisionResult(feats, deep, "dynamic graph", time.perf_counter() - t)

    def _session(self, file: str):
        if file not in self._sessions:
            self._sessions[file] = self._session_factory(self.files.path(file))
        return self._sessions[file]

    def _fallback_model(self):
        if self._fallback is None:
            info = self.manifest.fallback
            if not info:
                raise BundleError(f"{self.root}: the bundle carries no fallback vision weights")
            from .fallback import FallbackVision

            self._fallback = FallbackVision(self.files.path("config.json"), self.files.path(info["file"]))
        return self._fallback
