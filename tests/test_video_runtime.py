"""Video end to end at fp32: greedy tokens from the bundle equal Hugging Face ``generate`` on
the same video (unpatched transformers; the video inputs made by Hugging Face's own sampler,
smart_resize, patchify and prompt expansion, see ``hf_video_inputs``) for 24 new tokens: one
video on a bucket (from a file and from frames), a frame size with no bucket (the any-size
graph, and the PyTorch fallback), an image and a video in one prompt. A video with DeepStack
dropped on its tokens gives other tokens. The vision tower's treatment of a video grid as
independent temporal groups, which lets the image graphs serve video, is checked against the
unpatched tower itself."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from qwen3vl_compile import Pipeline
from qwen3vl_compile.cli import main as compile_main
from qwen3vl_compile.errors import ContextLengthError, RuntimeInputError
from qwen3vl_compile.runtime.video import Video

NEW_TOKENS = 24
FPS = 10.0
slow = pytest.mark.slow


def _clip(n: int, h: int, w: int, seed: int) -> np.ndarray:
    """``n`` frames of a moving, photo-like pattern (smoothed noise and a gradient that shift
    with time): every sampled frame differs, so positional bugs show."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (h, w + n * 4, 3)).astype(np.float32)
    ramp = np.linspace(0, 127, w + n * 4)[None, :, None]
    return np.stack([(base[:, i * 4:i * 4 + w] * 0.5 + ramp[:, i * 4:i * 4 + w]).astype(np.uint8) for i in range(n)])


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("video") / "bundle"
    rc = compile_main(["--model", "tiny-random", "--buckets", "256,dynamic", "--precision", "fp32", "-o", str(out), "-q"])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def pipe(bundle):
    with Pipeline.load(bundle, threads=2) as p:
        yield p


@pytest.fixture(scope="module")
def lossless_file(tmp_path_factory):
    """A 2-second FFV1 (lossless) Matroska clip at 10 fps: decoded frames equal the written ones."""
    pytest.importorskip("av", reason="PyAV (the [video] extra) writes the clip")
    from clips import write_clip

    frames = _clip(20, 256, 256, seed=7)
    path = tmp_path_factory.mktemp("clip") / "clip.mkv"
    write_clip(path, frames, int(FPS))
    return path, frames


def test_the_tower_treats_a_video_grid_as_independent_temporal_groups(tiny_visual):
    """Hugging Face's unpatched tower on a (3, h, w) grid equals three (1, h, w) calls
    concatenated: features and every DeepStack level."""
    import torch

    torch.manual_seed(0)
    t, h, w = 3, 8, 12
    dim = tiny_visual.config.in_channels * tiny_visual.config.temporal_patch_size * tiny_visual.config.patch_size**2
    x = torch.randn(t * h * w, dim)
    with torch.no_grad():
        whole = tiny_visual(x, grid_thw=torch.tensor([[t, h, w]]))
        parts = [tiny_visual(x[i * h * w:(i + 1) * h * w], grid_thw=torch.tensor([[1, h, w]])) for i in range(t)]
    torch.testing.assert_close(whole.pooler_output, torch.cat([p.pooler_output for p in parts]), rtol=1e-5, atol=1e-5)
    for level, ref in enumerate(whole.deepstack_features):
        torch.testing.assert_close(ref, torch.cat([p.deepstack_features[level] for p in parts]), rtol=1e-5, atol=1e-5)
    # ... and not trivially: the groups' features differ, and one group alone is not the whole
    assert not torch.allclose(parts[0].pooler_output, parts[1].pooler_output)


CASES = {
    # (frames (n, h, w, seed), an image too?, prompt, what serves the video)
    "bucket_frames": ((20, 256, 256, 1), False, "What happens in this video?", "bucket 256"),
    "no_bucket_dynamic": ((24, 192, 320, 2), False, "Describe the video.", "dynamic graph"),
    "image_and_video": ((16, 256, 256, 3), True, "Compare the picture with the video.", "bucket 256"),
}


@slow
@pytest.mark.parametrize("case", list(CASES))
def test_greedy_tokens_equal_hf_generate(pipe, hf_generate, tmp_path, case):
    (n, h, w, seed), with_image, prompt, served = CASES[case]
    frames = _clip(n, h, w, seed)
    images = []
    if with_image:
        images = [tmp_path / "img.png"]
        Image.fromarray(_clip(1, 256, 256, seed + 10)[0]).save(images[0])
    ref = hf_generate(images, prompt, NEW_TOKENS, videos=[(frames, FPS)])
    assert len(ref) >= NEW_TOKENS, "reference stopped early: pick another prompt"
    result = pipe.generate(images=images, videos=[Video(frames, fps=FPS)], prompt=prompt, max_new_tokens=NEW_TOKENS)
    assert result.token_ids == ref
    info = result.videos[0]
    assert info["served_by"].startswith(served) and info["frames"] == 4, info


@slow
def test_a_video_file_equals_its_frames_and_hf(pipe, hf_generate, lossless_file):
    path, frames = lossless_file
    ref = hf_generate([], "What happens in this video?", NEW_TOKENS, videos=[(frames, FPS)])
    got = pipe.generate(videos=[path], prompt="What happens in this video?", max_new_tokens=NEW_TOKENS)
    assert got.token_ids == ref
    assert got.videos[0]["timestamps"] == [0.3, 1.6] and got.videos[0]["grid_thw"] == [2, 16, 16]


@slow
def test_no_bucket_through_the_pytorch_fallback(bundle, hf_generate):
    frames = _clip(24, 192, 320, 2)
    ref = hf_generate([], "Describe the video.", NEW_TOKENS, videos=[(frames, FPS)])
    with Pipeline.load(bundle, threads=2) as p:
        p.vision.dynamic_file = None  # as in a bundle without the any-size graph
        got = p.generate(videos=[Video(frames, fps=FPS)], prompt="Describe the video.", max_new_tokens=NEW_TOKENS)
    assert got.videos[0]["served_by"].startswith("fallback (PyTorch eager)")
    assert got.token_ids == ref


@slow
def test_deepstack_dropped_on_video_tokens_fails_the_check(bundle, hf_generate, monkeypatch):
    from qwen3vl_compile.runtime.vision import VisionEncoder, VisionResult

    frames = _clip(20, 256, 256, 1)
    prompt = CASES["bucket_frames"][2]
    ref = hf_generate([], prompt, NEW_TOKENS, videos=[(frames, FPS)])
    real = VisionEncoder.encode_video

    def dropped(self, pixel_values, grid_thw):
        r = real(self, pixel_values, grid_thw)
        return VisionResult(r.image_features, np.zeros_like(r.deepstack), r.served_by, r.seconds)

    monkeypatch.setattr(VisionEncoder, "encode_video", dropped)
    with Pipeline.load(bundle, threads=2, vision_cache_mb=0) as p:
        got = p.generate(videos=[Video(frames, fps=FPS)], prompt=prompt, max_new_tokens=NEW_TOKENS)
    assert got.token_ids != ref


def test_video_tokens_over_the_context_are_refused_from_the_header(text_bundle, tmp_path):
    """Refused before any frame is decoded: the error names the frames and what to lower."""
    frames = np.zeros((600, 720, 1280, 3), np.uint8)[:, :1, :1]  # header-only sizes are what count
    big = np.broadcast_to(np.zeros((1, 720, 1280, 3), np.uint8), (600, 720, 1280, 3))
    with Pipeline.load(text_bundle) as p:
        with pytest.raises(ContextLengthError, match=r"frames of .* tokens\); lower --max-frames") as e:
            p.check_request(videos=[Video(big, fps=30.0)], prompt="What happens?")
        assert e.value.prompt_tokens > p.context_length
        with pytest.raises(RuntimeInputError, match="need their frame rate"):
            p.check_request(videos=[Video(frames)], prompt="x")
        with pytest.raises(RuntimeInputError, match="videos must be a list"):
            p.generate(videos="clip.mp4", prompt="x")
        with pytest.raises(RuntimeInputError, match="give a file path or Video"):
            p.generate(videos=[np.zeros((4, 32, 32, 3), np.uint8)], prompt="x")
