"""The checkpoint's image-processor settings (``preprocessor_config.json``, and the
manifest's ``processor`` section) as one frozen record: read by the compiler when it checks
bucket geometry, by the manifest's validation, and by the runtime's preprocessing
(:mod:`qwen3vl_compile.runtime.preprocess`), so it lives below all of them."""

from __future__ import annotations

import dataclasses

from PIL import Image

from .errors import LoadError


@dataclasses.dataclass(frozen=True)
class ProcessorConfig:
    """The checkpoint's image-processor values (``preprocessor_config.json``).

    The defaults are Qwen3-VL's checkpoint values, not the processor class defaults
    (which are Qwen2-VL's: patch 14, CLIP mean/std).
    """

    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 65536
    max_pixels: int = 16777216
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    resample: int = int(Image.Resampling.BICUBIC)

    @classmethod
    def from_dict(cls, d: dict) -> "ProcessorConfig":
        """Read ``preprocessor_config.json`` values. As in Hugging Face's constructor, the
        older ``min_pixels`` / ``max_pixels`` keys override ``size.shortest_edge`` /
        ``size.longest_edge`` when both are present."""
        size = d.get("size") or {}
        default = cls()
        min_pixels = d.get("min_pixels")
        if min_pixels is None:
            min_pixels = size.get("shortest_edge", default.min_pixels)
        max_pixels = d.get("max_pixels")
        if max_pixels is None:
            max_pixels = size.get("longest_edge", default.max_pixels)
        cfg = cls(
            patch_size=int(d.get("patch_size", default.patch_size)),
            temporal_patch_size=int(d.get("temporal_patch_size", default.temporal_patch_size)),
            merge_size=int(d.get("merge_size", default.merge_size)),
            min_pixels=int(min_pixels),
            max_pixels=int(max_pixels),
            image_mean=_per_channel(d.get("image_mean", default.image_mean)),
            image_std=_per_channel(d.get("image_std", default.image_std)),
            rescale_factor=float(d.get("rescale_factor", default.rescale_factor)),
            do_resize=bool(d.get("do_resize", True)),
            do_rescale=bool(d.get("do_rescale", True)),
            do_normalize=bool(d.get("do_normalize", True)),
            resample=int(d.get("resample", default.resample)),
        )
        sizes = (cfg.patch_size, cfg.temporal_patch_size, cfg.merge_size, cfg.max_pixels)
        if min(sizes) < 1 or cfg.min_pixels > cfg.max_pixels:
            raise LoadError(f"preprocessor config has impossible values: {d}")
        return cfg

    @property
    def factor(self) -> int:
        """Side lengths are multiples of this: one merged token covers ``factor`` pixels."""
        return self.patch_size * self.merge_size


def _per_channel(value) -> tuple[float, ...]:
    values = [value] * 3 if isinstance(value, (int, float)) else list(value)
    return tuple(float(v) for v in values)
