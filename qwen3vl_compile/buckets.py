"""Vision buckets: one static image size (and so one patch grid) per ONNX vision graph.

``224`` means 224x224; ``448x672`` means height 448, width 672. Each side must be a
multiple of ``patch_size * spatial_merge_size`` (32 for Qwen3-VL), because the vision
tower cuts 16-pixel patches and then merges 2x2 patches into one token.
"""

from __future__ import annotations

import dataclasses
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


def _nearest(value: int, factor: int) -> str:
    lo = (value // factor) * factor
    hi = lo + factor
    choices = [c for c in (lo, hi) if c > 0]
    return " or ".join(str(c) for c in choices)


def parse_bucket(text: str, *, patch_size: int = 16, merge_size: int = 2) -> VisionBucket:
    """Parse one bucket string; raise :class:`UsageError` (exit 2) with a helpful message."""
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
    for label, side in (("height", h), ("width", w)):
        if side <= 0:
            raise UsageError(f"bucket {text!r}: {label} must be a positive multiple of {factor}, got {side}")
        if side % factor:
            raise UsageError(
                f"bucket {text!r}: {label} {side} is not a multiple of {factor} "
                f"(patch {patch_size} x merge {merge_size}); nearest valid: {_nearest(side, factor)}"
            )
    return VisionBucket(h, w, patch_size=patch_size, merge_size=merge_size)


def parse_buckets(text: str, *, patch_size: int = 16, merge_size: int = 2) -> tuple[VisionBucket, ...]:
    """Parse ``"224,448,448x672"``. Duplicates (also ``448`` and ``448x448``) are refused."""
    parts = [p for p in text.split(",")]
    if not text.strip() or any(not p.strip() for p in parts):
        raise UsageError(f"--buckets {text!r}: give a comma-separated list such as 224,448 (no empty entries)")
    buckets: list[VisionBucket] = []
    seen: dict[tuple[int, int], str] = {}
    for part in parts:
        b = parse_bucket(part, patch_size=patch_size, merge_size=merge_size)
        key = (b.height, b.width)
        if key in seen:
            raise UsageError(f"--buckets {text!r}: {part.strip()!r} repeats bucket {seen[key]!r}")
        seen[key] = part.strip()
        buckets.append(b)
    return tuple(buckets)
