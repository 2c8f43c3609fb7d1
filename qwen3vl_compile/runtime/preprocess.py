"""Qwen3-VL image preprocessing in numpy + Pillow, equal to Hugging Face's
``Qwen2VLImageProcessorPil`` run with the checkpoint's own preprocessor values (from its
preprocessor_config.json, not the class defaults): no torch, no transformers.

1. load (path, PIL image or array) and convert to RGB, compositing transparency on white
   (``transformers.image_transforms.convert_to_rgb``);
2. ``smart_resize``: each side rounded to a multiple of ``patch * merge`` (32), scaled down
   (floor) above ``longest_edge`` pixels, up (ceil) below ``shortest_edge`` pixels;
3. Pillow **bicubic** resize of the uint8 image (the class attribute ``resample = BICUBIC``;
   the PIL backend hands uint8 pixels to ``Image.resize`` unchanged);
4. rescale first, then normalize, as the processor does: ``uint8 * rescale_factor`` computed
   in float64 and stored float32, then ``(x - mean) / std`` in float32;
5. duplicate the still image to ``temporal_patch_size`` frames and lay patches out in
   merge-block order: ``pixel_values [h*w, C*T*P*P]``, ``grid_thw = (1, h, w)``.

Two deliberate differences from Hugging Face: images smaller than one patch are refused
(Hugging Face 5.23 silently upscales a 10x40 image to 256x1024), and float arrays in [0, 1]
are taken as intensities (Hugging Face would rescale them twice unless ``do_rescale=False``).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ..errors import LoadError, RuntimeInputError
from ..processor_config import ProcessorConfig  # noqa: F401 - part of this module's interface

MAX_ASPECT_RATIO = 200


@dataclasses.dataclass
class ProcessedImage:
    """One image ready for the vision graph."""

    pixel_values: np.ndarray  # [t*h*w, C*T*P*P] float32, merge-block order
    grid_thw: tuple[int, int, int]
    resized: tuple[int, int]  # (height, width) fed to the patcher
    original: tuple[int, int]  # (height, width) as loaded
    merge_size: int = 2

    @property
    def num_tokens(self) -> int:
        """Image pad tokens this image takes in the prompt (``t*h*w / merge**2``)."""
        t, h, w = self.grid_thw
        return t * h * w // self.merge_size**2


def smart_resize(height: int, width: int, cfg: ProcessorConfig) -> tuple[int, int]:
    """``(height, width)`` the processor resizes an image to (Hugging Face's ``smart_resize``
    with ``factor = patch * merge``), refusing images it cannot serve."""
    _check_size(height, width, cfg)
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


def _check_size(height: int, width: int, cfg: ProcessorConfig) -> None:
    """Refuse images smaller than one patch and aspect ratios over 200 (typed, one line)."""
    if min(height, width) < cfg.patch_size:
        raise RuntimeInputError(
            f"image of {width}x{height} pixels is smaller than one {cfg.patch_size}-pixel patch"
        )
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise RuntimeInputError(
            f"image of {width}x{height} pixels has aspect ratio {ratio:.0f}, over the model's limit of {MAX_ASPECT_RATIO}"
        )


def grid_for_size(height: int, width: int, cfg: ProcessorConfig) -> tuple[int, int, int]:
    """The ``grid_thw`` an image of this size gets (decides which vision bucket serves it)."""
    h, w = smart_resize(height, width, cfg) if cfg.do_resize else (height, width)
    return (1, h // cfg.patch_size, w // cfg.patch_size)


def load_image(image) -> Image.Image:
    """Path, PIL image or array -> RGB PIL image.

    Arrays are HxW, HxWx1, HxWx3 or HxWx4: uint8, or float following Hugging Face's rule for
    PIL conversion (integer-valued floats in [0, 255] are pixel values; other floats must lie
    in [0, 1] and are scaled by 255, truncating like ``to_pil_image``). Files get their EXIF
    orientation applied, as ``transformers.image_utils.load_image`` does.
    """
    if isinstance(image, (str, Path)):
        image = _open_file(Path(image))
    elif isinstance(image, np.ndarray):
        image = Image.fromarray(_array_to_uint8(image))
    elif not isinstance(image, Image.Image):
        raise RuntimeInputError(f"unsupported image type {type(image).__name__}: give a path, a PIL image or an array")
    try:
        return to_rgb(image)
    except (OSError, ValueError) as e:  # a closed PIL image: "Operation on closed image"
        raise RuntimeInputError(f"PIL image of {image.width}x{image.height} pixels cannot be read ({e})") from None


def image_size(image) -> tuple[int, int]:
    """``(height, width)`` of an image without decoding its pixels: a file's header only
    (unreadable files and directories are refused here), an array's shape, a PIL image's size.
    EXIF rotation is not applied: the token count of a size does not depend on orientation."""
    if isinstance(image, (str, Path)):
        with _open_header(Path(image)) as im:
            return im.height, im.width
    if isinstance(image, np.ndarray):
        if image.ndim not in (2, 3):
            raise RuntimeInputError(f"image array of shape {image.shape}: expected HxW, HxWx1, HxWx3 or HxWx4 (channels last)")
        return int(image.shape[0]), int(image.shape[1])
    if isinstance(image, Image.Image):
        return image.height, image.width
    raise RuntimeInputError(f"unsupported image type {type(image).__name__}: give a path, a PIL image or an array")


def _open_header(path: Path) -> Image.Image:
    """``Image.open`` (which reads the header only), with our one line for what it refuses.
    Pillow's decompression-bomb warning is not printed: sizes are checked against the
    bundle's context from the header, before any pixel is decoded."""
    if path.is_dir():
        raise RuntimeInputError(f"image {str(path)!r} is a directory; give an image file")
    if not path.is_file():
        raise RuntimeInputError(f"image {str(path)!r}: no such file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(path)
    except Image.DecompressionBombError as e:
        raise RuntimeInputError(f"image {str(path)!r}: too large to decode ({e})") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise RuntimeInputError(f"image {str(path)!r}: cannot be read ({e})") from None


def _open_file(path: Path) -> Image.Image:
    with _open_header(path) as im:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                im.load()
                return ImageOps.exif_transpose(im)
        except (OSError, Image.DecompressionBombError, ValueError, SyntaxError) as e:
            raise RuntimeInputError(f"image {str(path)!r}: cannot be read ({e})") from None


def _array_to_uint8(arr: np.ndarray) -> np.ndarray:
    """HWC / HW array -> uint8 HxW or HxWxC (C in 3, 4) for ``Image.fromarray``."""
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)) or arr.size == 0:
        raise RuntimeInputError(f"image array of shape {arr.shape}: expected HxW, HxWx1, HxWx3 or HxWx4 (channels last)")
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if arr.dtype == np.bool_ or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise RuntimeInputError(f"image array of dtype {arr.dtype}: expected uint8 or float")
    if not np.isfinite(arr).all():
        raise RuntimeInputError("image array contains NaN or infinity")
    lo, hi = float(arr.min()), float(arr.max())
    if np.array_equal(arr, np.round(arr)) and lo >= 0 and hi <= 255:
        return arr.astype(np.uint8)
    if lo >= 0 and hi <= 1:
        # Hugging Face's to_pil_image: float64 * 255 -> float32 -> uint8 (truncating).
        return (arr.astype(np.float64) * 255).astype(np.float32).astype(np.uint8)
    raise RuntimeInputError(f"image array with values in [{lo}, {hi}]: expected floats in [0, 1] or integers in [0, 255]")


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto white (as Hugging Face's processor does)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def preprocess(image, cfg: ProcessorConfig, *, size: tuple[int, int] | None = None) -> ProcessedImage:
    """Full preprocessing. ``size=(height, width)`` forces the resize target (multiples of
    ``patch * merge``); :func:`fit` is the grid-level way to ask for it."""
    img = load_image(image)
    width, height = img.size
    if size is None:
        if cfg.do_resize:
            size = smart_resize(height, width, cfg)
        else:
            _check_size(height, width, cfg)
            size = (height, width)
    rh, rw = (int(v) for v in size)
    if rh % cfg.factor or rw % cfg.factor or min(rh, rw) < cfg.factor:
        raise RuntimeInputError(
            f"target size {rw}x{rh}: both sides must be positive multiples of {cfg.factor} (patch x merge)"
        )
    if (rh, rw) != (height, width):
        img = img.resize((rw, rh), resample=cfg.resample)
    x = normalize(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1), cfg)
    pixel_values, gh, gw = patchify(x, cfg)
    return ProcessedImage(pixel_values, (1, gh, gw), (rh, rw), (height, width), cfg.merge_size)


def fit(image, grid_thw, cfg: ProcessorConfig) -> ProcessedImage:
    """Preprocess an image stretched so that its grid equals ``grid_thw`` (``(1, h, w)``), for
    serving it with a vision bucket of that grid. The aspect ratio is not kept."""
    t, gh, gw = (int(v) for v in grid_thw)
    if t != 1 or gh % cfg.merge_size or gw % cfg.merge_size or min(gh, gw) < cfg.merge_size:
        raise RuntimeInputError(
            f"cannot fit an image to grid {tuple(grid_thw)}: expected (1, h, w) with h, w multiples of {cfg.merge_size}"
        )
    img = load_image(image)
    _check_size(img.height, img.width, cfg)
    return preprocess(img, cfg, size=(gh * cfg.patch_size, gw * cfg.patch_size))


def normalize(chw_uint8: np.ndarray, cfg: ProcessorConfig) -> np.ndarray:
    """Rescale then normalize, with Hugging Face's dtypes: the rescale multiplies in float64
    and stores float32 (``image_transforms.rescale``); mean/std are applied in float32."""
    x = chw_uint8.astype(np.float64) * cfg.rescale_factor if cfg.do_rescale else chw_uint8.astype(np.float64)
    x = x.astype(np.float32)
    if cfg.do_normalize:
        mean = np.asarray(cfg.image_mean, dtype=np.float32)[:, None, None]
        std = np.asarray(cfg.image_std, dtype=np.float32)[:, None, None]
        x = (x - mean) / std
    return x


def patchify(x: np.ndarray, cfg: ProcessorConfig) -> tuple[np.ndarray, int, int]:
    """CHW float32 -> ``[gh*gw, C*T*P*P]`` in merge-block order, the frame repeated T times.

    Rows go merge block by merge block (row-major over blocks, then row-major inside a
    block); each row is channel-major, then the T copies, then the P x P pixels.
    """
    c, h, w = x.shape
    p, m, t = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    gh, gw = h // p, w // p
    patches = x.reshape(c, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
    patches = np.broadcast_to(patches[:, :, :, :, :, None], (*patches.shape[:5], t, p, p))
    return np.ascontiguousarray(patches.reshape(gh * gw, c * t * p * p), dtype=np.float32), gh, gw
