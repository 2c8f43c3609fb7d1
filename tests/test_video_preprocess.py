"""The numpy video processor (qwen3vl_compile.runtime.video) against transformers 5.24's pure
pieces of Qwen3VLVideoProcessor / Qwen3VLProcessor (its sampler, its video smart_resize, its
patchify, its timestamps and prompt expansion, called on small fake objects: the class itself
needs torchvision) and against clips written here with PyAV."""

import dataclasses
import functools
import itertools
import sys
import types

import numpy as np
import pytest
from PIL import Image

from qwen3vl_compile.errors import LoadError, RuntimeInputError
from qwen3vl_compile.processor_config import ProcessorConfig
from qwen3vl_compile.runtime import video as V
from qwen3vl_compile.runtime.preprocess import preprocess

CFG = V.VideoProcessorConfig()


@functools.cache
def _hf_video():
    """transformers' video_processing_qwen3_vl module. Without torchvision, transformers'
    lazy package hands out a dummy that refuses every attribute, so the file is loaded
    directly (it only needs torchvision inside the processor's resize, not used here)."""
    pytest.importorskip("torch")
    import importlib.util
    import os

    import transformers.models.qwen3_vl as package

    name = "transformers.models.qwen3_vl._video_processing_for_tests"
    spec = importlib.util.spec_from_file_location(name, os.path.join(os.path.dirname(package.__file__), "video_processing_qwen3_vl.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # auto_docstring looks the class's file up through sys.modules
    spec.loader.exec_module(module)
    return module


def _pattern(i: int, h: int = 48, w: int = 64) -> np.ndarray:
    """Frame ``i`` of a test clip: a gradient, a square moving right, and the frame number
    written as bits along the top row, so that every frame differs."""
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([(xx * 4 + i) % 256, (yy * 5) % 256, np.full((h, w), 60)], axis=-1).astype(np.uint8)
    x0 = (i * 3) % (w - 12)
    img[16:28, x0 : x0 + 12] = (250, 30, 200)
    for b in range(8):
        img[0:4, b * 4 : b * 4 + 4] = 255 if (i >> b) & 1 else 0
    return img


def _write(path, codec, n, fps=12, pix_fmt="yuv420p", options=None, gop=None, container_options=None):
    av = pytest.importorskip("av", reason="PyAV writes the test clips")
    with av.open(str(path), "w", options=container_options or {}) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = 64, 48, pix_fmt
        if gop:
            stream.codec_context.gop_size = gop
        stream.options = options or {}
        for i in range(n):
            for packet in stream.encode(av.VideoFrame.from_ndarray(_pattern(i), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    pytest.importorskip("av", reason="PyAV writes and reads the test clips")
    root = tmp_path_factory.mktemp("clips")
    return {
        "ffv1": _write(root / "lossless.mkv", "ffv1", 60, pix_fmt="bgr0"),
        "h264": _write(root / "clip.mp4", "libx264", 72, options={"crf": "23", "bf": "2"}, gop=10),
    }


def _all_frames(path):
    import av

    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


# --- config ---------------------------------------------------------------------------


def test_defaults_are_the_hugging_face_class_attributes():
    hf = _hf_video().Qwen3VLVideoProcessor
    assert (CFG.fps, CFG.min_frames, CFG.max_frames) == (hf.fps, hf.min_frames, hf.max_frames)
    assert (CFG.min_pixels, CFG.max_pixels) == (hf.size["shortest_edge"], hf.size["longest_edge"])
    assert (CFG.patch_size, CFG.temporal_patch_size, CFG.merge_size) == (hf.patch_size, hf.temporal_patch_size, hf.merge_size)
    assert list(CFG.image_mean) == list(hf.image_mean) and list(CFG.image_std) == list(hf.image_std)
    assert CFG.do_sample_frames is hf.do_sample_frames and CFG.max_video_tokens == hf.max_video_tokens
    assert CFG.resample == int(hf.resample) and not hf.cap_pixels_per_frame and not CFG.cap_pixels_per_frame


def test_from_dict_reads_a_checkpoint_file():
    d = {"size": {"shortest_edge": 4096, "longest_edge": 25165824}, "patch_size": 16, "temporal_patch_size": 2,
         "merge_size": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": 0.5, "fps": 2, "max_frames": 64,
         "do_sample_frames": True, "video_processor_type": "Qwen3VLVideoProcessor"}
    cfg = V.VideoProcessorConfig.from_dict(d)
    assert (cfg.min_pixels, cfg.max_pixels, cfg.max_frames, cfg.fps) == (4096, 25165824, 64, 2.0)
    assert cfg.image_std == (0.5, 0.5, 0.5) and cfg.min_frames == 4
    assert V.VideoProcessorConfig.from_dict({}) == CFG


def test_from_dict_names_each_bad_value():
    bad = {"fps": "fast", "min_frames": 0, "size": {"longest_edge": -1}, "do_sample_frames": "yes", "image_mean": [0.5, None]}
    with pytest.raises(LoadError) as e:
        V.VideoProcessorConfig.from_dict(bad)
    text = str(e.value)
    for key in ("fps: expected a positive number", "min_frames: expected a positive integer",
                "size.longest_edge: expected a positive integer", "do_sample_frames: expected true or false", "image_mean"):
        assert key in text, text
    assert "\n" not in text
    with pytest.raises(LoadError, match="min_frames 9 is above max_frames 8"):
        V.VideoProcessorConfig.from_dict({"min_frames": 9, "max_frames": 8})


def test_overrides():
    cfg = CFG.with_overrides(fps=1, max_frames=2, max_pixels=10**6)
    assert (cfg.fps, cfg.max_frames, cfg.min_frames, cfg.max_pixels) == (1.0, 2, 2, 10**6)
    with pytest.raises(RuntimeInputError, match="video fps: expected a positive number"):
        CFG.with_overrides(fps=0)
    with pytest.raises(RuntimeInputError, match="below the model's minimum"):
        CFG.with_overrides(max_pixels=100)


# --- sampling, resize, timestamps against Hugging Face ----------------------------------


def test_sampling_equals_hugging_face():
    hf = _hf_video()
    from transformers.video_utils import VideoMetadata

    cases = itertools.product([1, 2, 3, 5, 7, 24, 61, 100, 901, 4000], [1, 7.5, 12, 24, 29.97, 60],
                              [0.5, 1, 2, 4.5], [(4, 768), (1, 3), (8, 16), (2, 2000)])
    for total, video_fps, fps, (lo, hi) in cases:
        fake = types.SimpleNamespace(fps=fps, min_frames=lo, max_frames=hi)
        ref = hf.Qwen3VLVideoProcessor.sample_frames(fake, VideoMetadata(total_num_frames=total, fps=video_fps))
        cfg = dataclasses.replace(CFG, fps=fps, min_frames=lo, max_frames=hi)
        ours = V.sample_indices(total, video_fps, cfg)
        assert ours.tolist() == ref.tolist(), (total, video_fps, fps, lo, hi)
    assert V.sample_indices(5, 1, dataclasses.replace(CFG, do_sample_frames=False)).tolist() == list(range(5))


def test_smart_resize_equals_hugging_face():
    hf = _hf_video()
    for cfg in (CFG, dataclasses.replace(CFG, min_pixels=4096, max_pixels=25165824), dataclasses.replace(CFG, max_pixels=2 * 10**6)):
        for t, h, w in itertools.product([2, 3, 4, 9, 16, 64, 768], [10, 31, 48, 96, 240, 480, 720, 1080, 2160],
                                          [17, 64, 128, 320, 640, 1280, 1920, 3840]):
            try:
                ref = hf.smart_resize(t, h, w, temporal_factor=2, factor=32, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
            except ValueError:  # aspect ratio over 200
                with pytest.raises(RuntimeInputError, match="aspect ratio"):
                    V.smart_resize(t, h, w, cfg)
                continue
            assert V.smart_resize(t, h, w, cfg) == ref, (t, h, w, cfg.min_pixels, cfg.max_pixels)


def test_per_frame_cap_equals_hugging_face_patch_count():
    hf = _hf_video()
    cfg = dataclasses.replace(CFG, cap_pixels_per_frame=True, min_pixels=4096, max_pixels=25165824)
    fake = types.SimpleNamespace(size={"shortest_edge": 4096, "longest_edge": 25165824}, patch_size=16, merge_size=2,
                                 temporal_patch_size=2, cap_pixels_per_frame=True, max_video_tokens=768)
    for t, h, w in itertools.product([2, 5, 16, 200], [240, 720, 2160], [320, 1280, 3840]):
        h_bar, w_bar = V.smart_resize(t, h, w, cfg)
        ours = -(-t // 2) * (h_bar // 16) * (w_bar // 16)
        assert ours == hf.Qwen3VLVideoProcessor.get_num_of_video_patches(fake, t, h, w), (t, h, w)


def test_smart_resize_refusals():
    with pytest.raises(RuntimeInputError, match="1 frame.*give it as an image"):
        V.smart_resize(1, 64, 64, CFG)
    with pytest.raises(RuntimeInputError, match="aspect ratio"):
        V.smart_resize(4, 40, 9000, CFG)


def _hf_processor_fake(temporal=2, merge=2):
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    fake = types.SimpleNamespace(
        video_processor=types.SimpleNamespace(merge_size=merge, temporal_patch_size=temporal),
        image_token="<|image_pad|>", video_token=V.VIDEO_PAD, audio_token=None,
        vision_start_token=V.VISION_START, vision_end_token=V.VISION_END, all_special_multimodal_tokens=[V.VIDEO_PAD],
    )
    fake._calculate_timestamps = functools.partial(Qwen3VLProcessor._calculate_timestamps, fake)
    return Qwen3VLProcessor, fake


@pytest.mark.parametrize("total, fps", [(9, 3.0), (5, 1.0), (48, 12.0), (7, 29.97), (100, 24.0), (3, 2.0)])
def test_timestamps_and_prompt_equal_hugging_face(total, fps):
    from transformers.video_utils import VideoMetadata

    processor, fake = _hf_processor_fake()
    frames = np.stack([_pattern(i, 40, 72) for i in range(total)])
    ours = V.preprocess_video(frames, CFG, fps=fps)
    t, h, w = ours.grid_thw
    assert t == -(-len(ours.indices) // 2)
    assert list(ours.timestamps) == processor._calculate_timestamps(fake, np.asarray(ours.indices), fps, 2)
    inputs = {"video_grid_thw": np.asarray([ours.grid_thw]),
              "video_metadata": [VideoMetadata(total_num_frames=total, fps=fps, frames_indices=list(ours.indices))]}
    ref = processor.replace_video_token(fake, inputs, 0)
    assert V.video_placeholder(ours) == ref
    assert ours.tokens_per_group == h * w // 4 and ours.num_tokens == t * h * w // 4
    chat = f"<|im_start|>user\n{V.VISION_START}{V.VIDEO_PAD}{V.VISION_END}Describe.<|im_end|>\n"
    ref_text, _ = processor.get_text_with_replacements(fake, [chat], [], [ref], [])
    assert V.expand_video_pads(chat, [ours]) == ref_text[0]
    assert ref_text[0].count(V.VISION_START) == t + 1  # the template's wrapper stays in 5.24


def test_odd_frame_count_is_padded_with_the_last_frame():
    frames = np.stack([_pattern(i, 64, 96) for i in range(5)])
    cfg = dataclasses.replace(CFG, do_sample_frames=False, do_resize=False)
    odd = V.preprocess_video(frames, cfg, fps=1)
    even = V.preprocess_video(np.concatenate([frames, frames[-1:]]), cfg, fps=1)
    assert odd.grid_thw == even.grid_thw and odd.grid_thw[0] == 3
    np.testing.assert_array_equal(odd.pixel_values, even.pixel_values)
    assert odd.timestamps == (0.5, 2.5, 4.0)


# --- pixels ----------------------------------------------------------------------------


def _reference_pixels(frames, cfg):
    """HF's video smart_resize and patchify (torch) around a Pillow bicubic resize and a
    float64 rescale/normalize written out here."""
    import torch

    hf = _hf_video()
    t, h, w, _ = frames.shape
    rh, rw = hf.smart_resize(t, h, w, temporal_factor=cfg.temporal_patch_size, factor=cfg.factor,
                             min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    resized = np.stack([np.asarray(Image.fromarray(f).resize((rw, rh), Image.Resampling.BICUBIC)) for f in frames])
    x = (resized.astype(np.float64) / 255 - 0.5) / 0.5
    x = torch.from_numpy(x.transpose(0, 3, 1, 2).astype(np.float32))[None]
    patches, gt, gh, gw = hf.Qwen3VLVideoProcessor.patchify(None, x, cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size)
    return patches[0].numpy(), (gt, gh, gw)


@pytest.mark.parametrize("t, h, w", [(4, 48, 64), (5, 96, 128), (3, 200, 150), (8, 720, 1280)])
def test_pixel_values_equal_reference(t, h, w):
    rng = np.random.default_rng(t)
    frames = rng.integers(0, 256, (t, h, w, 3), dtype=np.uint8)
    cfg = dataclasses.replace(CFG, do_sample_frames=False)
    ours = V.preprocess_video(frames, cfg, fps=10)
    ref, grid = _reference_pixels(frames, cfg)
    assert ours.grid_thw == grid and ours.pixel_values.dtype == np.float32
    assert ours.pixel_values.shape == ref.shape
    assert float(np.abs(ours.pixel_values - ref).max()) <= 1e-6


def test_two_equal_frames_equal_the_image_route():
    img_cfg = ProcessorConfig()
    cfg = dataclasses.replace(CFG, min_pixels=2 * img_cfg.min_pixels, max_pixels=2 * img_cfg.max_pixels, do_sample_frames=False)
    frame = np.random.default_rng(1).integers(0, 256, (190, 250, 3), dtype=np.uint8)
    image = preprocess(frame, img_cfg)
    video = V.preprocess_video([frame, Image.fromarray(frame)], cfg, fps=1)
    assert image.grid_thw == video.grid_thw == (1, 14, 20) and image.resized == video.resized
    np.testing.assert_array_equal(video.pixel_values, image.pixel_values)
    assert video.num_tokens == image.num_tokens


# --- decoding --------------------------------------------------------------------------


@pytest.mark.parametrize("gap", [0, V.SEEK_GAP])
@pytest.mark.parametrize("kind", ["ffv1", "h264"])
def test_seeking_decode_equals_sequential_decode(clips, kind, gap, monkeypatch):
    path = clips[kind]
    full = _all_frames(path)
    monkeypatch.setattr(V, "SEEK_GAP", gap)
    monkeypatch.setattr(V, "_decode_sequential", lambda *a: pytest.fail("fell back to a sequential decode"))
    for cfg in (CFG, CFG.with_overrides(max_frames=5), CFG.with_overrides(fps=7)):
        clip = V.load_video(path, cfg)
        assert clip.total_frames == len(full) and clip.fps == 12.0
        assert clip.indices.tolist() == V.sample_indices(len(full), 12.0, cfg).tolist()
        assert clip.frames.shape == (len(clip.indices), 48, 64, 3) and clip.frames.dtype == np.uint8
        for frame, i in zip(clip.frames, clip.indices):
            np.testing.assert_array_equal(frame, full[i])
            if kind == "ffv1":  # lossless: the very frame written
                np.testing.assert_array_equal(frame, _pattern(int(i)))


def test_sequential_fallback_gives_the_same_frames(clips, monkeypatch):
    def unseekable(*args):
        raise V._Unseekable

    seeking = V.load_video(clips["h264"])
    monkeypatch.setattr(V, "_decode_seeking", unseekable)
    sequential = V.load_video(clips["h264"])
    np.testing.assert_array_equal(seeking.indices, sequential.indices)
    np.testing.assert_array_equal(seeking.frames, sequential.frames)


def test_frame_count_of_a_container_without_one(clips):
    import av

    with av.open(str(clips["ffv1"])) as c:
        assert c.streams.video[0].frames == 0  # Matroska does not say: counted by demuxing
    assert V.load_video(clips["ffv1"]).total_frames == 60


def test_file_preprocess_end_to_end(clips):
    out = V.preprocess_video(str(clips["h264"]))
    assert out.indices == tuple(V.sample_indices(72, 12.0, CFG).tolist()) and len(out.indices) == 12
    assert out.grid_thw[0] == 6 and out.timestamps[0] == pytest.approx(1 / 12 * 6.5 / 2, abs=0.05)
    assert out.pixel_values.shape[0] == np.prod(out.grid_thw)


# --- bad input -------------------------------------------------------------------------


def _audio_only(path):
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("mp2", rate=44100, layout="mono")
        for k in range(4):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1152), np.int16), format="s16", layout="mono")
            frame.sample_rate, frame.pts = 44100, k * 1152
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def _no_frames(path):
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=12)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        out.start_encoding()  # header and trailer, no packet
    return path


def test_bad_files_are_refused_naming_the_file(clips, tmp_path):
    pytest.importorskip("av", reason="PyAV reads the bad files")
    random_bytes = tmp_path / "noise.mp4"
    random_bytes.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    half = tmp_path / "half.mp4"
    data = clips["h264"].read_bytes()
    half.write_bytes(data[: len(data) // 2])
    # The index (moov) first, so that a cut file still opens and declares all its frames.
    fast = _write(tmp_path / "faststart.mp4", "libx264", 72, container_options={"movflags": "faststart"})
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(fast.read_bytes()[: fast.stat().st_size * 2 // 3])
    png = tmp_path / "still.mp4"
    Image.fromarray(_pattern(0)).save(png, format="PNG")
    cases = {
        tmp_path / "missing.mp4": "no such file",
        tmp_path: "is a directory",
        random_bytes: "cannot be read",
        half: "cannot be read",
        cut: "of the 72 the container declares cannot be decoded",
        _audio_only(tmp_path / "audio.mka"): "has no video stream",
        png: "is a still image",
        _no_frames(tmp_path / "empty.avi"): "has no frames",
    }
    for path, message in cases.items():
        with pytest.raises(RuntimeInputError) as e:
            V.load_video(path)
        text = str(e.value)
        assert str(path) in text and message in text and "\n" not in text, text


def test_missing_pyav_says_how_to_install(clips, tmp_path, monkeypatch):
    path = tmp_path / "clip.mp4"
    path.write_bytes(b"\0" * 16)
    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(RuntimeInputError, match=r"pip install 'qwen3vl-compile\[video\]'") as e:
        V.load_video(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("video, kwargs, message", [
    (np.zeros((4, 8, 8, 3), np.float32), {"fps": 2}, "expected T x H x W x 3 uint8"),
    (np.zeros((8, 8, 3), np.uint8), {"fps": 2}, "expected T x H x W x 3 uint8"),
    (np.zeros((4, 8, 8, 3), np.uint8), {}, "need their frame rate"),
    (np.zeros((4, 8, 8, 3), np.uint8), {"fps": float("nan")}, "video fps must be a positive number"),
    ([np.zeros((8, 8, 3), np.uint8), np.zeros((8, 9, 3), np.uint8)], {"fps": 2}, "video frame 1 is 9x8 pixels"),
    ([np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.uint8)], {"fps": 2}, "video frame 1 is an array of shape"),
    ([np.zeros((8, 8, 3), np.uint8), "frame.png"], {"fps": 2}, "video frame 1 is a str"),
    ([], {"fps": 2}, "frame list is empty"),
    (b"bytes", {"fps": 2}, "unsupported video type bytes"),
])
def test_bad_in_memory_input(video, kwargs, message):
    with pytest.raises(RuntimeInputError, match=message):
        V.load_video(video, **kwargs)
