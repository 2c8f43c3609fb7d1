"""Qwen3-VL image preprocessing in numpy + Pillow, equal to Hugging Face's
``Qwen2VLImageProcessorPil`` run with the checkpoint's own preprocessor values (REFERENCE
section 4): no torch, no transformers.

1. load (path, PIL image or array) and convert to RGB, compositing transparency on white;
2. ``smart_resize``: each side rounded to a multiple of ``patch * merge`` (32), scaled down
   (floor) above ``longest_edge`` pixels, up (ceil) below ``shortest_edge`` pixels;
3. Pillow bicubic resize; rescale by 1/255 (computed in float64, stored float32);
   normalize with the checkpoint's mean/std;
4. duplicate the still image to ``temporal_patch_size`` frames and lay patches out in
   merge-block order: ``pixel_values [h*w, C*T*P*P]``, ``grid_thw = (1, h, w)``.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import RuntimeInputError

MAX_ASPECT_RATIO = 200


@dataclasses.dataclass(frozen=True)
class ProcessorConfig:
    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 65536
    max_pixels: int = 16777216
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255

    @classmethod
    def from_dict(cls, d: dict) -> "ProcessorConfig":
        size = d.get("size") or {}
        return cls(
            patch_size=int(d.get("patch_size", 16)),
            temporal_patch_size=int(d.get("temporal_patch_size", 2)),
            merge_size=int(d.get("merge_size", 2)),
            min_pixels=int(size.get("shortest_edge", d.get("min_pixels", 65536))),
            max_pixels=int(size.get("longest_edge", d.get("max_pixels", 16777216))),
            image_mean=tuple(d.get("image_mean", (0.5, 0.5, 0.5))),
            image_std=tuple(d.get("image_std", (0.5, 0.5, 0.5))),
            rescale_factor=float(d.get("rescale_factor", 1 / 255)),
        )

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size


@dataclasses.dataclass
class ProcessedImage:
    pixel_values: np.ndarray  # [h*w, C*T*P*P] float32
    grid_thw: tuple[int, int, int]
    resized: tuple[int, int]  # (height, width) fed to the patcher
    original: tuple[int, int]

    @property
    def num_tokens(self) -> int:
        return self.grid_thw[1] * self.grid_thw[2] // 4


def smart_resize(height: int, width: int, cfg: ProcessorConfig) -> tuple[int, int]:
    """Hugging Face's smart_resize (Qwen2-VL image processor), with our typed errors."""
    if min(height, width) < 1:
        raise RuntimeInputError(f"image of {width}x{height} pixels is empty")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise RuntimeInputError(
            f"image of {width}x{height} pixels has aspect ratio {max(height, width) / min(height, width):.0f}, over {MAX_ASPECT_RATIO}"
        )
    f = cfg.factor
    h_bar = round(height / f) * f
    w_bar = round(width / f) * f
    if h_bar * w_bar > cfg.max_pixels:
        beta = math.sqrt((height * width) / cfg.max_pixels)
        h_bar = max(f, math.floor(height / beta / f) * f)
        w_bar = max(f, math.floor(width / beta / f) * f)
    elif h_bar * w_bar < cfg.min_pixels:
        beta = math.sqrt(cfg.min_pixels / (height * width))
        h_bar = math.ceil(height * beta / f) * f
        w_bar = math.ceil(width * beta / f) * f
    return h_bar, w_bar


def grid_for_size(height: int, width: int, cfg: ProcessorConfig) -> tuple[int, int, int]:
    """The ``grid_thw`` an image of this size gets (decides which bucket serves it)."""
    h, w = smart_resize(height, width, cfg)
    return (1, h // cfg.patch_size, w // cfg.patch_size)


def load_image(image) -> Image.Image:
    """Path, PIL image or array (HWC/HW, uint8 or float in [0, 1]) -> RGB PIL image."""
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise RuntimeInputError(f"image {str(path)!r}: no such file")
        try:
            with Image.open(path) as im:
                im.load()
                image = im.copy()
        except (OSError, Image.DecompressionBombError, ValueError) as e:
            raise RuntimeInputError(f"image {str(path)!r}: cannot be read ({e})") from None
    elif isinstance(image, np.ndarray):
        arr = image
        if arr.dtype != np.uint8:
            if np.issubdtype(arr.dtype, np.floating) and arr.size and arr.max() <= 1.0:
                arr = (arr * 255).round()
            arr = np.clip(arr, 0, 255).astype(np.uint8)
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
            raise RuntimeInputError(f"image array of shape {image.shape}: expected HxW, HxWx3 or HxWx4")
        image = Image.fromarray(arr)
    elif not isinstance(image, Image.Image):
        raise RuntimeInputError(f"unsupported image type {type(image).__name__}: give a path, a PIL image or an array")
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto white (as Hugging Face does)."""
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def preprocess(image, cfg: ProcessorConfig, *, size: tuple[int, int] | None = None) -> ProcessedImage:
    """Full preprocessing; ``size=(height, width)`` forces the resize target (``--on-miss fit``)."""
    img = load_image(image)
    width, height = img.size
    if size is None:
        if min(height, width) < cfg.patch_size:
            raise RuntimeInputError(f"image of {width}x{height} pixels is smaller than one {cfg.patch_size}-pixel patch")
        size = smart_resize(height, width, cfg)
    rh, rw = size
    if (rh, rw) != (height, width):
        img = img.resize((rw, rh), resample=Image.Resampling.BICUBIC)
    arr = np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)  # CHW
    x = (arr.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    mean = np.asarray(cfg.image_mean, dtype=np.float32)[:, None, None]
    std = np.asarray(cfg.image_std, dtype=np.float32)[:, None, None]
    x = (x - mean) / std
    pixel_values, gh, gw = patchify(x, cfg)
    return ProcessedImage(pixel_values, (1, gh, gw), (rh, rw), (height, width))


def patchify(x: np.ndarray, cfg: ProcessorConfig) -> tuple[np.ndarray, int, int]:
    """CHW float32 -> [gh*gw, C*T*P*P] in merge-block order, the frame repeated T times."""
    c, h, w = x.shape
    p, m, t = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    gh, gw = h // p, w // p
    patches = x.reshape(c, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
    patches = np.broadcast_to(patches[:, :, :, :, :, None], (*patches.shape[:5], t, p, p))
    return np.ascontiguousarray(patches.reshape(gh * gw, c * t * p * p), dtype=np.float32), gh, gw
