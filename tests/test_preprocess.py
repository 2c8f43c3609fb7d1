"""Our numpy/Pillow preprocessing against Hugging Face's ``Qwen2VLImageProcessorPil`` built
with the checkpoint's own preprocessor values (never the class defaults, which are Qwen2-VL's)."""

import copy
import json

import numpy as np
import pytest
from PIL import Image

from qwen3vl_compile.errors import RuntimeInputError
from qwen3vl_compile.runtime.preprocess import ProcessorConfig, fit, grid_for_size, load_image, preprocess, smart_resize

TOL = 1e-5


@pytest.fixture(scope="module")
def values(tiny_path):
    return json.loads((tiny_path / "preprocessor_config.json").read_text())


def _hf(values, **overrides):
    from transformers import Qwen2VLImageProcessorPil

    # Deep copy: the constructor writes min/max_pixels into the ``size`` dict it is given.
    kwargs = {k: v for k, v in copy.deepcopy(values).items() if k not in ("image_processor_type", "processor_class")}
    return Qwen2VLImageProcessorPil(**{**kwargs, **copy.deepcopy(overrides)})


@pytest.fixture(scope="module")
def hf(values):
    return _hf(values)


@pytest.fixture(scope="module")
def cfg(values):
    return ProcessorConfig.from_dict(values)


def _image(w, h, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    if mode == "L":
        return Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L")
    channels = 4 if mode == "RGBA" else 3
    return Image.fromarray(rng.integers(0, 256, (h, w, channels), dtype=np.uint8), mode)


def _assert_equal_to_hf(ours, ref):
    assert list(ours.grid_thw) == ref["image_grid_thw"][0].tolist()
    assert ours.pixel_values.dtype == np.float32
    assert ours.pixel_values.shape == ref["pixel_values"].shape
    diff = float(np.abs(ours.pixel_values - ref["pixel_values"]).max())
    assert diff <= TOL, diff
    return diff


def test_checkpoint_values_are_not_class_defaults(cfg, hf):
    from transformers import Qwen2VLImageProcessorPil

    assert (cfg.patch_size, hf.patch_size) == (16, 16) and Qwen2VLImageProcessorPil.patch_size == 14
    assert cfg.image_mean == tuple(hf.image_mean) == (0.5, 0.5, 0.5)
    assert (cfg.min_pixels, cfg.max_pixels) == (hf.size["shortest_edge"], hf.size["longest_edge"])


@pytest.mark.parametrize(
    "w, h, mode, grid",
    [
        (448, 448, "RGB", (1, 28, 28)),
        (224, 224, "RGB", (1, 16, 16)),  # below min_pixels: upscaled to 256x256
        (500, 375, "RGB", (1, 24, 32)),
        (37, 900, "RGB", None),  # tall and narrow, upscaled
        (1000, 300, "RGB", None),
        (1280, 720, "RGB", None),
        (333, 517, "RGBA", None),
        (257, 190, "L", None),
        (300, 200, "P", None),
    ],
)
def test_equal_to_hugging_face(cfg, hf, w, h, mode, grid):
    img = _image(w, h, "RGB" if mode == "P" else mode).convert(mode) if mode == "P" else _image(w, h, mode)
    ours = preprocess(img, cfg)
    _assert_equal_to_hf(ours, hf(images=[img], return_tensors="np"))
    if grid:
        assert ours.grid_thw == grid
    assert grid_for_size(h, w, cfg) == ours.grid_thw
    assert ours.num_tokens == hf.get_number_of_image_patches(h, w) // 4


def test_transparent_png_file(cfg, hf, tmp_path):
    rng = np.random.default_rng(3)
    rgba = rng.integers(0, 256, (240, 320, 4), dtype=np.uint8)
    rgba[:80, :, 3] = 0  # a fully transparent band: white after compositing, not the hidden RGB
    path = tmp_path / "t.png"
    Image.fromarray(rgba, "RGBA").save(path)
    ours = preprocess(path, cfg)
    with Image.open(path) as im:
        _assert_equal_to_hf(ours, hf(images=[im], return_tensors="np"))
    assert np.allclose(ours.pixel_values[0], 1.0)  # top-left block is inside the white band


def test_exif_orientation_applied_like_hf_load_image(cfg, hf, tmp_path):
    from transformers.image_utils import load_image as hf_load_image

    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees when shown
    path = tmp_path / "rot.jpg"
    _image(400, 200).save(path, exif=exif, quality=95)
    ours = preprocess(path, cfg)
    assert ours.original == (400, 200)  # (height, width) after the transpose
    _assert_equal_to_hf(ours, hf(images=[hf_load_image(str(path))], return_tensors="np"))


def test_max_pixels_floor_and_legacy_keys(values):
    """A small max_pixels exercises the downscale branch; the older min/max_pixels keys
    override ``size`` in both implementations."""
    legacy = {**values, "min_pixels": 4096, "max_pixels": 200_000}
    cfg = ProcessorConfig.from_dict(legacy)
    hf = _hf(legacy)
    assert (cfg.min_pixels, cfg.max_pixels) == (hf.size["shortest_edge"], hf.size["longest_edge"]) == (4096, 200_000)
    for w, h in [(1000, 700), (96, 64), (2000, 40)]:
        img = _image(w, h, seed=w)
        ours = preprocess(img, cfg)
        _assert_equal_to_hf(ours, hf(images=[img], return_tensors="np"))
        assert ours.resized[0] * ours.resized[1] <= 200_000


def test_arrays(cfg, hf):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (300, 420, 3), dtype=np.uint8)
    rgba = rng.integers(0, 256, (300, 420, 4), dtype=np.uint8)
    gray = rng.integers(0, 256, (300, 420, 1), dtype=np.uint8)
    for arr in (rgb, rgba, gray):
        _assert_equal_to_hf(preprocess(arr, cfg), hf(images=[arr], return_tensors="np"))
    # 2-D grayscale: Hugging Face rejects it; we read it as HxWx1.
    assert np.array_equal(preprocess(gray[..., 0], cfg).pixel_values, preprocess(gray, cfg).pixel_values)
    # Integer-valued floats are pixel values; floats in [0, 1] are intensities, which is what
    # Hugging Face computes when told not to rescale again.
    assert np.array_equal(preprocess(rgb.astype(np.float64), cfg).pixel_values, preprocess(rgb, cfg).pixel_values)
    f01 = rng.random((300, 420, 3), dtype=np.float32)
    _assert_equal_to_hf(preprocess(f01, cfg), hf(images=[f01], do_rescale=False, return_tensors="np"))


def test_paths_pil_and_arrays_agree(cfg, tmp_path):
    img = _image(320, 240)
    path = tmp_path / "a.png"
    img.save(path)
    a, b, c = (preprocess(x, cfg).pixel_values for x in (path, str(path), np.asarray(img)))
    assert np.array_equal(a, b) and np.array_equal(b, c)
    assert load_image(path).mode == "RGB"


@pytest.mark.parametrize("grid", [(1, 14, 14), (1, 8, 20), (1, 28, 28)])
def test_fit_to_grid(values, cfg, grid):
    """``fit`` stretches to the grid with the processor's own filter: equal to Hugging Face's
    processing of the image stretched to that size (a min_pixels low enough to keep it)."""
    img = _image(500, 375, seed=7)
    ours = fit(img, grid, cfg)
    assert ours.grid_thw == grid and ours.original == (375, 500)
    hf = _hf(values, size={"shortest_edge": 1024, "longest_edge": values["size"]["longest_edge"]})
    stretched = img.resize((grid[2] * 16, grid[1] * 16), resample=hf.resample)
    _assert_equal_to_hf(ours, hf(images=[stretched], return_tensors="np"))


def test_bad_images(cfg, hf, tmp_path):
    with pytest.raises(RuntimeInputError, match="no such file"):
        preprocess(tmp_path / "missing.png", cfg)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(RuntimeInputError, match="cannot be read"):
        preprocess(bad, cfg)
    with pytest.raises(RuntimeInputError, match="smaller than one 16-pixel patch"):
        preprocess(_image(10, 40), cfg)
    with pytest.raises(RuntimeInputError, match="smaller than one 16-pixel patch"):
        grid_for_size(40, 15, cfg)
    # The aspect-ratio limit is Hugging Face's: 4020x20 (201) is refused by both, 4000x20 by neither.
    with pytest.raises(RuntimeInputError, match="aspect ratio 201"):
        preprocess(_image(4020, 20), cfg)
    with pytest.raises(ValueError, match="aspect ratio"):
        hf(images=[_image(4020, 20)], return_tensors="np")
    assert smart_resize(20, 4000, cfg) == tuple(int(v) * 16 for v in hf(images=[_image(4000, 20)])["image_grid_thw"][0][1:])
    with pytest.raises(RuntimeInputError, match="cannot fit"):
        fit(_image(64, 64), (1, 7, 8), cfg)
    with pytest.raises(RuntimeInputError, match="expected HxW"):
        preprocess(np.zeros((3, 64, 64, 2), np.uint8), cfg)
    with pytest.raises(RuntimeInputError, match=r"expected floats in \[0, 1\]"):
        preprocess(np.full((64, 64, 3), 1.5), cfg)
    with pytest.raises(RuntimeInputError, match="unsupported image type"):
        preprocess([[0]], cfg)
