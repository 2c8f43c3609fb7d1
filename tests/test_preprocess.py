"""Our numpy/Pillow preprocessing against Hugging Face's image processor with the
checkpoint's own values."""

import json

import numpy as np
import pytest
from PIL import Image

from qwen3vl_compile.errors import RuntimeInputError
from qwen3vl_compile.runtime.preprocess import ProcessorConfig, grid_for_size, preprocess


@pytest.fixture(scope="module")
def processors(tiny_path):
    from transformers import Qwen2VLImageProcessorPil

    values = json.loads((tiny_path / "preprocessor_config.json").read_text())
    kwargs = {k: v for k, v in values.items() if k not in ("image_processor_type", "processor_class")}
    return ProcessorConfig.from_dict(values), Qwen2VLImageProcessorPil(**kwargs)


def _image(w, h, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    if mode == "L":
        return Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L")
    channels = 4 if mode == "RGBA" else 3
    return Image.fromarray(rng.integers(0, 256, (h, w, channels), dtype=np.uint8), mode)


@pytest.mark.parametrize(
    "w, h, mode, grid",
    [
        (448, 448, "RGB", (1, 28, 28)),
        (224, 224, "RGB", (1, 16, 16)),  # below min_pixels: upscaled to 256x256
        (500, 375, "RGB", (1, 24, 32)),
        (900, 37, "RGB", None),
        (300, 1000, "RGB", None),
        (333, 517, "RGBA", None),
        (257, 190, "L", None),
        (1920, 1080, "RGB", None),
    ],
)
def test_equal_to_hugging_face(processors, w, h, mode, grid):
    ours_cfg, hf = processors
    img = _image(w, h, mode)
    ref = hf(images=[img], return_tensors="np")
    ours = preprocess(img, ours_cfg)
    assert list(ours.grid_thw) == ref["image_grid_thw"][0].tolist()
    if grid:
        assert ours.grid_thw == grid
    assert ours.pixel_values.shape == ref["pixel_values"].shape
    assert np.abs(ours.pixel_values - ref["pixel_values"]).max() <= 1e-5
    assert grid_for_size(h, w, ours_cfg) == ours.grid_thw


def test_paths_and_arrays(processors, tmp_path):
    cfg, _ = processors
    img = _image(320, 240)
    p = tmp_path / "a.png"
    img.save(p)
    a = preprocess(p, cfg).pixel_values
    b = preprocess(np.asarray(img), cfg).pixel_values
    c = preprocess(img, cfg).pixel_values
    assert np.array_equal(a, c) and np.array_equal(b, c)


def test_bad_images(processors, tmp_path):
    cfg, _ = processors
    with pytest.raises(RuntimeInputError, match="no such file"):
        preprocess(tmp_path / "missing.png", cfg)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(RuntimeInputError, match="cannot be read"):
        preprocess(bad, cfg)
    with pytest.raises(RuntimeInputError, match="smaller than one 16-pixel patch"):
        preprocess(_image(10, 40), cfg)
    with pytest.raises(RuntimeInputError, match="aspect ratio"):
        preprocess(_image(4100, 20), cfg)
