"""Vision buckets: one static image size (and so one patch grid) per ONNX vision graph.

``224`` means 224x224; ``448x672`` means height 448, width 672. Each side must be a
multiple of ``patch_size * spatial_merge_size`` (32 for Qwen3-VL), because the vision
tower cuts 16-pixel patches and then merges 2x2 patches into one token.

The word ``dynamic`` (at most once) adds the any-size vision graph, whose grid is an input
(:class:`DynamicVision`), next to the static buckets.
"""

from __future__ import annotations

import dataclasses
import math
import re

from .errors import UsageError

_SIDE = r"\s*(\d+)\s*"
_BUCKET_RE = re.compile(rf"^{_SIDE}(?:[xX]{_SIDE})?$")


@dataclasses.dataclass(frozen=True)
class VisionBucket:
    """A static vision graph: images of exactly ``height`` x ``width`` pixels."""

    height: int
    width: int
    patch_size: int = 16
    merge_size: int = 2
    temporal_patch_size: int = 2

    @property
    def name(self) -> str:
        return str(self.height) if self.height == self.width else f"{self.height}x{self.width}"

    @property
    def grid_thw(self) -> tuple[int, int, int]:
        """(t, h, w) in patches, as Hugging Face's ``image_grid_thw`` for one still image."""
        return (1, self.height // self.patch_size, self.width // self.patch_size)

    @property
    def num_patches(self) -> int:
        _, h, w = self.grid_thw
        return h * w

    @property
    def num_tokens(self) -> int:
        """Merged image tokens (rows of the image features)."""
        return self.num_patches // (self.merge_size**2)

    @property
    def patch_dim(self) -> int:
        return 3 * self.temporal_patch_size * self.patch_size * self.patch_size

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "height": self.height,
            "width": self.width,
            "grid_thw": list(self.grid_thw),
            "num_patches": self.num_patches,
            "num_tokens": self.num_tokens,
        }


DYNAMIC = "dynamic"


@dataclasses.dataclass(frozen=True)
class DynamicVision:
    """The any-size vision graph: the grid comes from ``image_grid_thw`` at run time."""

    patch_size: int = 16
    merge_size: int = 2
    temporal_patch_size: int = 2

    @property
    def name(self) -> str:
        return DYNAMIC


def split_buckets(buckets) -> tuple[tuple[VisionBucket, ...], DynamicVision | None]:
    """The static buckets, and the dynamic graph's entry if one was asked for."""
    static = tuple(b for b in buckets if isinstance(b, VisionBucket))
    dynamic = next((b for b in buckets if isinstance(b, DynamicVision)), None)
    return static, dynamic


def _nearest(value: int, factor: int, limit: int | None = None) -> str:
    """The multiples of ``factor`` either side of ``value``, those up to ``limit`` (the largest
    side the model's max_pixels allows) only; the limit itself when both are above it."""
    lo = (value // factor) * factor
    hi = lo + factor
    choices = [c for c in (lo, hi) if c > 0 and (limit is None or c <= limit)]
    if not choices and limit:
        return f"{limit} (the largest the checkpoint's max_pixels allows)"
    return " or ".join(str(c) for c in choices)


def _side_limit(other: int, factor: int, max_pixels: int | None, square: bool) -> int | None:
    """The largest multiple of ``factor`` a side may be with ``max_pixels`` (None: unknown)."""
    if not max_pixels:
        return None
    side = math.isqrt(max_pixels) if square else max_pixels // max(other, 1)
    return (side // factor) * factor


def parse_bucket(text: str, *, patch_size: int = 16, merge_size: int = 2, max_pixels: int | None = None) -> VisionBucket:
    """Parse one bucket string; raise :class:`UsageError` (exit 2) with a helpful message.
    ``max_pixels`` (the checkpoint's, when known) bounds the sizes a refusal suggests."""
    factor = patch_size * merge_size
    m = _BUCKET_RE.match(text)
    if not m:
        if re.match(r"^\s*-", text) or re.search(r"x\s*-", text):
            raise UsageError(f"bucket {text!r}: sizes must be positive multiples of {factor}")
        raise UsageError(
            f"bucket {text!r} is not a size: write SIDE (e.g. 448) or HEIGHTxWIDTH (e.g. 448x672), "
            f"each a multiple of {factor}"
        )
    h = int(m.group(1))
    w = int(m.group(2)) if m.group(2) is not None else h
    for label, side, other in (("height", h, w), ("width", w, h)):
        if side <= 0:
            raise UsageError(f"bucket {text!r}: {label} must be a positive multiple of {factor}, got {side}")
        if side % factor:
            limit = _side_limit(other, factor, max_pixels, square=m.group(2) is None)
            raise UsageError(
                f"bucket {text!r}: {label} {side} is not a multiple of {factor} "
                f"(patch {patch_size} x merge {merge_size}); nearest valid: {_nearest(side, factor, limit)}"
            )
    return VisionBucket(h, w, patch_size=patch_size, merge_size=merge_size)


def parse_buckets(
    text: str, *, patch_size: int = 16, merge_size: int = 2, max_pixels: int | None = None
) -> tuple[VisionBucket | DynamicVision, ...]:
    """Parse ``"224,448,448x672,dynamic"``. Duplicates (also ``448`` and ``448x448``, or
    ``dynamic`` twice) are refused."""
    parts = [p for p in text.split(",")]
    if not text.strip() or any(not p.strip() for p in parts):
        raise UsageError(f"--buckets {text!r}: give a comma-separated list such as 224,448 (no empty entries)")
    buckets: list[VisionBucket | DynamicVision] = []
    seen: dict[tuple[int, int], str] = {}
    dynamic_seen = False
    for part in parts:
        if part.strip().lower() == DYNAMIC:
            if dynamic_seen:
                raise UsageError(f"--buckets {text!r}: {DYNAMIC!r} is given more than once")
            dynamic_seen = True
            buckets.append(DynamicVision(patch_size=patch_size, merge_size=merge_size))
            continue
        try:
            b = parse_bucket(part, patch_size=patch_size, merge_size=merge_size, max_pixels=max_pixels)
        except UsageError as e:
            if "is not a size" not in str(e):
                raise
            raise UsageError(f"{e.args[0]}; or the word {DYNAMIC!r} for the any-size graph") from None
        key = (b.height, b.width)
        if key in seen:
            raise UsageError(f"--buckets {text!r}: {part.strip()!r} repeats bucket {seen[key]!r}")
        seen[key] = part.strip()
        buckets.append(b)
    return tuple(buckets)
