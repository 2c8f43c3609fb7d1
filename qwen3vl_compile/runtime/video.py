"""Qwen3-VL video preprocessing in numpy + Pillow (+ PyAV to read files): no torch, no
transformers. It reproduces transformers 5.24's ``Qwen3VLVideoProcessor`` and the video part
of ``Qwen3VLProcessor``:

1. **sampling** (``Qwen3VLVideoProcessor.sample_frames``): ``n = int(total / video_fps * fps)``
   clamped to ``[min_frames, max_frames]`` and to ``total``; indices
   ``linspace(0, total - 1, n).round()``. 5.24 does *not* round ``n`` to a multiple of
   ``temporal_patch_size`` here (Qwen2-VL's sampler does): an odd count is padded later.
   With ``do_sample_frames=False`` every frame is kept.
2. **resize**: the video ``smart_resize`` (sides multiples of ``patch * merge``; the pixel
   bounds ``size.shortest_edge`` / ``size.longest_edge`` count the pixels of *all* frames,
   ``round(T / temporal_patch_size) * temporal_patch_size * h * w``; sides shorter than the
   factor are first scaled up to it; aspect ratios over 200 and fewer than
   ``temporal_patch_size`` frames are refused). The per-frame cap of 5.24
   (``cap_pixels_per_frame``, qwen-vl-utils' rule) exists but is off by default there
   (``None`` -> ``False`` with a warning); it is off here too unless the config sets it.
   Frames are resized with **Pillow bicubic on uint8**, the image route's resample
   (:mod:`.preprocess`), so that a video and an image of the same frame get the same pixels;
   Hugging Face's video processor resizes with torchvision instead, which differs by a few
   intensity levels.
3. rescale + normalize with the image route's dtypes (:func:`.preprocess.normalize`);
4. pad the frame count to a multiple of ``temporal_patch_size`` with copies of the last frame
   and lay patches out as ``Qwen3VLVideoProcessor.patchify``: ``[t*h*w, C*T*P*P]``, temporal
   group by group, merge blocks row-major inside a group;
5. **prompt**: Qwen3VLProcessor (5.24) replaces only the ``<|video_pad|>`` the chat template
   emits (the template's own ``<|vision_start|>`` / ``<|vision_end|>`` around it stay), by, per
   temporal group, ``<{t:.1f} seconds><|vision_start|>`` + pads + ``<|vision_end|>``, ``t`` the
   mean time of the group's first and last frame (``_calculate_timestamps``). (transformers
   4.57 replaced the whole wrapped placeholder instead.)

Files are read with PyAV (the ``video`` extra); only the sampled frames are decoded.
"""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import LoadError, RuntimeInputError
from .preprocess import normalize, to_rgb

VIDEO_PAD = "<|video_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
MAX_ASPECT_RATIO = 200
INSTALL_HINT = "pip install 'qwen3vl-compile[video]'"
# Decode forward instead of seeking when the next sampled frame is this close.
SEEK_GAP = 16


@dataclasses.dataclass(frozen=True)
class VideoProcessorConfig:
    """``video_preprocessor_config.json`` values. Missing keys take the class attributes of
    transformers 5.24's ``Qwen3VLVideoProcessor`` (fps 2, 4..768 frames, ``size`` 128*32*32 ..
    768*32*32 pixels over all frames, patch 16, temporal 2, merge 2, mean/std 0.5)."""

    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 768
    min_pixels: int = 128 * 32 * 32  # size.shortest_edge, all frames together
    max_pixels: int = 768 * 32 * 32  # size.longest_edge, all frames together
    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    do_sample_frames: bool = True
    cap_pixels_per_frame: bool = False
    max_video_tokens: int = 768
    resample: int = int(Image.Resampling.BICUBIC)

    @classmethod
    def from_dict(cls, d: dict) -> "VideoProcessorConfig":
        """Read the JSON values, refusing wrong types and impossible values: one
        :class:`LoadError` listing one line per bad key (the file comes from the checkpoint,
        as for :class:`~qwen3vl_compile.processor_config.ProcessorConfig`)."""
        if not isinstance(d, dict):
            raise LoadError(f"video preprocessor config must be a JSON object, got {type(d).__name__}")
        default, values, problems = cls(), {}, []
        size = d.get("size", {})
        if not isinstance(size, dict):
            problems.append(f"size: expected an object with shortest_edge / longest_edge, got {size!r}")
            size = {}
        keys = {f.name: f.name for f in dataclasses.fields(cls)}
        keys.update(min_pixels=("size", "shortest_edge"), max_pixels=("size", "longest_edge"))
        for field, key in keys.items():
            src, name = (size, key[1]) if isinstance(key, tuple) else (d, key)
            if name not in src or src[name] is None:
                continue
            label = f"size.{name}" if isinstance(key, tuple) else name
            value, wanted = src[name], getattr(default, field)
            try:
                values[field] = _convert(value, wanted)
            except ValueError as e:
                problems.append(f"{label}: {e}, got {value!r}")
        if not problems:
            cfg = cls(**values)
            problems = cfg._problems()
        if problems:
            raise LoadError("video preprocessor config has bad values:\n" + "\n".join(problems))
        return cfg

    def _problems(self) -> list[str]:
        out = []
        if self.min_frames > self.max_frames:
            out.append(f"min_frames {self.min_frames} is above max_frames {self.max_frames}")
        if self.min_pixels > self.max_pixels:
            out.append(f"size.shortest_edge {self.min_pixels} is above size.longest_edge {self.max_pixels}")
        if len(self.image_mean) != len(self.image_std):
            out.append("image_mean and image_std have different lengths")
        return out

    def with_overrides(self, *, fps=None, max_frames=None, max_pixels=None) -> "VideoProcessorConfig":
        """The config with the run-time overrides (``--video-fps``, ``--max-frames``,
        ``--video-max-pixels``) applied; each must be a positive number."""
        changes = {}
        for name, value, kind in (("fps", fps, float), ("max_frames", max_frames, int), ("max_pixels", max_pixels, int)):
            if value is None:
                continue
            try:
                changes[name] = _convert(value, kind(1))
            except ValueError as e:
                raise RuntimeInputError(f"video {name.replace('_', ' ')}: {e}, got {value!r}") from None
        cfg = dataclasses.replace(self, **changes)
        if cfg.min_frames > cfg.max_frames:
            cfg = dataclasses.replace(cfg, min_frames=cfg.max_frames)
        if cfg.min_pixels > cfg.max_pixels:
            raise RuntimeInputError(f"video max pixels {cfg.max_pixels} is below the model's minimum of {cfg.min_pixels}")
        return cfg

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size


def _convert(value, like):
    """``value`` as the type of ``like`` (bool, positive int, positive finite float, or a
    per-channel tuple of floats); ValueError with what was expected."""
    if isinstance(like, bool):
        if not isinstance(value, bool):
            raise ValueError("expected true or false")
        return value
    if isinstance(like, tuple):
        items = [value] * 3 if _is_number(value) else value
        if not isinstance(items, (list, tuple)) or not items or not all(_is_number(v) for v in items):
            raise ValueError("expected a number or a list of numbers")
        return tuple(float(v) for v in items)
    if isinstance(like, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError("expected a positive integer")
        return value
    if not _is_number(value) or not math.isfinite(value) or value <= 0:
        raise ValueError("expected a positive number")
    return float(value)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# --- sampling, resize, timestamps -------------------------------------------------------


def sample_indices(total_frames: int, video_fps: float, cfg: VideoProcessorConfig) -> np.ndarray:
    """Indices of the frames to keep (``Qwen3VLVideoProcessor.sample_frames`` with the
    config's ``fps``, ``min_frames`` and ``max_frames``): int64, ascending."""
    total = int(total_frames)
    if not cfg.do_sample_frames:
        return np.arange(total, dtype=np.int64)
    n = int(total / video_fps * cfg.fps)
    n = min(max(n, cfg.min_frames), cfg.max_frames, total)
    return np.linspace(0, total - 1, n).round().astype(np.int64)


def smart_resize(num_frames: int, height: int, width: int, cfg: VideoProcessorConfig) -> tuple[int, int]:
    """``(height, width)`` every frame is resized to: transformers' video ``smart_resize``
    with ``factor = patch * merge``, ``temporal_factor = temporal_patch_size`` and the pixel
    bounds of all frames (capped per frame first when ``cap_pixels_per_frame`` is set)."""
    f, tf = cfg.factor, cfg.temporal_patch_size
    if num_frames < tf:
        raise RuntimeInputError(
            f"a video of {num_frames} frame(s) is shorter than the model's {tf}-frame temporal patch; give it as an image"
        )
    max_pixels = cfg.max_pixels
    if cfg.cap_pixels_per_frame:
        per_frame = max(min(cfg.max_video_tokens * f * f, cfg.max_pixels // num_frames), int(cfg.min_pixels * 1.05))
        max_pixels = per_frame * num_frames
    if height < f or width < f:  # too small: scale up until the short side is one factor
        scale = max(f / height, f / width)
        height, width = int(height * scale), int(width * scale)
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise RuntimeInputError(
            f"video of {width}x{height} pixels has aspect ratio {ratio:.0f}, over the model's limit of {MAX_ASPECT_RATIO}"
        )
    h_bar, w_bar = round(height / f) * f, round(width / f) * f
    t_bar = round(num_frames / tf) * tf
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt(num_frames * height * width / max_pixels)
        h_bar = max(f, math.floor(height / beta / f) * f)
        w_bar = max(f, math.floor(width / beta / f) * f)
    elif t_bar * h_bar * w_bar < cfg.min_pixels:
        beta = math.sqrt(cfg.min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / f) * f
        w_bar = math.ceil(width * beta / f) * f
    return h_bar, w_bar


def timestamps(indices, video_fps: float, temporal_patch_size: int = 2) -> list[float]:
    """Seconds of each temporal group: the indices padded with the last one to a multiple of
    ``temporal_patch_size``, then the mean of each group's first and last frame time
    (``Qwen3VLProcessor._calculate_timestamps``)."""
    idx = [int(i) for i in indices]
    idx += idx[-1:] * (-len(idx) % temporal_patch_size)
    times = [i / video_fps for i in idx]
    return [(times[g] + times[g + temporal_patch_size - 1]) / 2 for g in range(0, len(times), temporal_patch_size)]


# --- inputs and plans -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Video:
    """A video given to the runtime: ``source`` a file path, a list of frames (PIL images or
    H x W x 3 uint8 arrays) or a ``T x H x W x 3`` uint8 array; ``fps`` the source's frame
    rate (required for frames; for a file it replaces the container's rate)."""

    source: object
    fps: float | None = None

    @classmethod
    def of(cls, value, where: str = "video") -> "Video":
        """A path or a :class:`Video`; anything else is refused with what to write instead."""
        if isinstance(value, Video):
            return value
        if isinstance(value, (str, Path)) or hasattr(value, "__fspath__"):
            return cls(Path(value))
        raise RuntimeInputError(f"{where}: give a file path or Video(frames, fps=...) "
                                f"(frames: a list of images or a T x H x W x 3 uint8 array), got {type(value).__name__}")

    def describe(self) -> str:
        return str(self.source) if isinstance(self.source, Path) else f"in-memory video ({_count(self.source)} frames)"


def _count(source) -> int | str:
    try:
        return len(source)
    except TypeError:
        return "?"


class _GroupTokens:
    """Token counts of a video record with ``grid_thw`` and ``merge_size``."""

    @property
    def tokens_per_group(self) -> int:
        """Video pad tokens of one temporal group (``h*w / merge**2``)."""
        _, h, w = self.grid_thw
        return h * w // self.merge_size**2

    @property
    def num_tokens(self) -> int:
        """All video pad tokens of this video (``t*h*w / merge**2``)."""
        return self.grid_thw[0] * self.tokens_per_group


@dataclasses.dataclass(frozen=True)
class VideoPlan(_GroupTokens):
    """What a video will become, from its header alone (no frame decoded): the sampled
    frames, the size every frame is resized to, the grid and the prompt's timestamps."""

    indices: tuple[int, ...]
    fps: float
    original: tuple[int, int]  # (height, width) of the source frames
    resized: tuple[int, int]
    grid_thw: tuple[int, int, int]
    timestamps: tuple[float, ...]
    merge_size: int
    fitted: bool = False  # resized to a given size (a bucket's), not by smart_resize


def plan_video(video: Video, cfg: VideoProcessorConfig, *, size: tuple[int, int] | None = None) -> VideoPlan:
    """The :class:`VideoPlan` of ``video``: a file's frame count, rate and frame size come from
    its container (nothing is decoded), in-memory frames' from their shapes. ``size``
    (height, width) replaces the resize of :func:`smart_resize` (a bucket's size)."""
    total, rate, height, width = _header(video)
    video_fps = rate if video.fps is None else _check_fps(video.fps, "video fps")
    indices = sample_indices(total, video_fps, cfg)
    return _plan(indices, video_fps, (height, width), cfg, size)


def _plan(indices, video_fps: float, original, cfg: VideoProcessorConfig, size) -> VideoPlan:
    n = len(indices)
    if size is not None:
        rh, rw = size
    elif cfg.do_resize:
        rh, rw = smart_resize(n, *original, cfg)
    else:
        rh, rw = original
    tp, p = cfg.temporal_patch_size, cfg.patch_size
    grid = (-(-n // tp), rh // p, rw // p)
    ts = tuple(timestamps(indices, video_fps, tp))
    return VideoPlan(tuple(int(i) for i in indices), video_fps, tuple(original), (rh, rw), grid, ts, cfg.merge_size,
                     fitted=size is not None)


def _header(video: Video) -> tuple[int, float, int, int]:
    """(frames, frame rate, height, width) of a video without decoding it."""
    source = video.source
    if isinstance(source, Path):
        name = f"video {str(source)!r}"
        _check_file(source, name)
        av = _import_av(source)
        try:
            with av.open(str(source)) as container:
                stream, rate = _video_stream(container, name)
                total = stream.frames or _count_packets(container, stream)
                height, width = stream.codec_context.height, stream.codec_context.width
        except (av.FFmpegError, OSError, ValueError, EOFError) as e:
            raise _unreadable(name, e) from None
        if total == 0:
            raise RuntimeInputError(f"{name} has no frames")
        if not height or not width:
            raise RuntimeInputError(f"{name}: the container gives no frame size")
        return total, float(rate), height, width
    frames = _in_memory_frames(source)
    if video.fps is None:
        raise RuntimeInputError("in-memory video frames need their frame rate: Video(frames, fps=...)")
    height, width = _frame_size(frames[0], 0)
    return len(frames), float(video.fps), height, width


# --- loading --------------------------------------------------------------------------


@dataclasses.dataclass
class VideoClip:
    """The sampled frames of a video."""

    frames: np.ndarray  # [T, H, W, 3] uint8
    fps: float  # the source's frame rate
    indices: np.ndarray  # [T] int64: which source frames these are
    total_frames: int  # frames in the source


def load_video(video, cfg: VideoProcessorConfig | None = None, *, fps: float | None = None) -> VideoClip:
    """A video file (str / Path, read with PyAV), a list of frames (PIL images or HxWx3 uint8
    arrays) or a ``[T, H, W, 3]`` uint8 array -> its sampled frames (:func:`sample_indices`).

    ``fps`` is the source's frame rate: required for in-memory frames; for a file it replaces
    the container's rate in sampling and timestamps (not in locating frames).
    """
    cfg = cfg or VideoProcessorConfig()
    if fps is not None:
        fps = _check_fps(fps, "video fps")
    if isinstance(video, (str, Path)):
        return _load_file(Path(video), cfg, fps)
    frames = _in_memory_frames(video)
    if fps is None:
        raise RuntimeInputError("in-memory video frames need their frame rate: pass fps=")
    sizes = [_frame_size(f, i) for i, f in enumerate(frames)]
    for i, s in enumerate(sizes):
        if s != sizes[0]:
            raise RuntimeInputError(f"video frame {i} is {s[1]}x{s[0]} pixels, frame 0 is {sizes[0][1]}x{sizes[0][0]}: all frames must have one size")
    indices = sample_indices(len(frames), fps, cfg)
    picked = np.stack([_frame_array(frames[i]) for i in indices])
    return VideoClip(picked, fps, indices, len(frames))


def _in_memory_frames(video) -> list:
    """The frames of an in-memory video (a ``T x H x W x 3`` uint8 array or a list), checked."""
    if isinstance(video, np.ndarray):
        if video.ndim != 4 or video.shape[-1] != 3 or video.dtype != np.uint8 or 0 in video.shape:
            raise RuntimeInputError(f"video array of shape {video.shape} and dtype {video.dtype}: expected T x H x W x 3 uint8")
        return list(video)
    if isinstance(video, (list, tuple)):
        if not video:
            raise RuntimeInputError("video frame list is empty")
        return list(video)
    raise RuntimeInputError(f"unsupported video type {type(video).__name__}: give a path, a list of frames or a T x H x W x 3 uint8 array")


def _check_fps(fps, name: str) -> float:
    if not _is_number(fps) or not math.isfinite(fps) or fps <= 0:
        raise RuntimeInputError(f"{name} must be a positive number, got {fps!r}")
    return float(fps)


def _frame_size(frame, i: int) -> tuple[int, int]:
    if isinstance(frame, Image.Image):
        return frame.height, frame.width
    if isinstance(frame, np.ndarray) and frame.ndim == 3 and frame.shape[-1] == 3 and frame.dtype == np.uint8 and frame.size:
        return frame.shape[0], frame.shape[1]
    what = f"an array of shape {frame.shape} and dtype {frame.dtype}" if isinstance(frame, np.ndarray) else f"a {type(frame).__name__}"
    raise RuntimeInputError(f"video frame {i} is {what}: expected a PIL image or an H x W x 3 uint8 array")


def _frame_array(frame) -> np.ndarray:
    if isinstance(frame, Image.Image):
        return np.asarray(to_rgb(frame), dtype=np.uint8)
    return frame


def _import_av(path: Path):
    try:
        import av
    except ImportError:
        raise RuntimeInputError(f"video {str(path)!r}: reading video files needs PyAV: {INSTALL_HINT}") from None
    return av


def _check_file(path: Path, name: str) -> None:
    if path.is_dir():
        raise RuntimeInputError(f"{name} is a directory; give a video file")
    if not path.is_file():
        raise RuntimeInputError(f"{name}: no such file")


def _unreadable(name: str, e: BaseException) -> RuntimeInputError:
    reason = getattr(e, "strerror", None) or str(e)  # FFmpeg's reason without the path again
    return RuntimeInputError(f"{name}: cannot be read ({' '.join(str(reason).split())})")


def _load_file(path: Path, cfg: VideoProcessorConfig, fps: float | None) -> VideoClip:
    name = f"video {str(path)!r}"
    _check_file(path, name)
    av = _import_av(path)
    try:
        with av.open(str(path)) as container:
            return _read(container, name, cfg, fps)
    except (av.FFmpegError, OSError, ValueError, EOFError) as e:
        raise _unreadable(name, e) from None


def _video_stream(container, name: str):
    """The first video stream and its frame rate; a still image or a file without video is refused."""
    fmt = container.format.name
    if fmt == "image2" or fmt.endswith("_pipe"):
        raise RuntimeInputError(f"{name} is a still image ({fmt}), not a video; give it as an image")
    if not container.streams.video:
        raise RuntimeInputError(f"{name} has no video stream")
    stream = container.streams.video[0]
    rate = stream.average_rate or stream.guessed_rate
    if not rate:
        raise RuntimeInputError(f"{name}: the container gives no frame rate")
    return stream, Fraction(rate)


def _read(container, name: str, cfg: VideoProcessorConfig, fps: float | None) -> VideoClip:
    stream, rate = _video_stream(container, name)
    stream.thread_type = "AUTO"
    total = stream.frames or _count_packets(container, stream)
    if total == 0:
        raise RuntimeInputError(f"{name} has no frames")
    video_fps = fps if fps is not None else float(rate)
    indices = sample_indices(total, video_fps, cfg)
    wanted = sorted(set(int(i) for i in indices))
    try:
        got = _decode_seeking(container, stream, wanted, rate)
    except _Unseekable:
        got = _decode_sequential(container, stream, wanted)
    missing = [i for i in wanted if i not in got]
    if missing:
        raise RuntimeInputError(
            f"{name}: frame {missing[0]} of the {total} the container declares cannot be decoded (truncated file?)"
        )
    return VideoClip(np.stack([got[int(i)] for i in indices]), video_fps, indices, total)


class _Unseekable(Exception):
    """Frames without pts, or a seek that lands past its target: decode sequentially."""


def _count_packets(container, stream) -> int:
    """Frames of a stream whose container does not say (Matroska, WebM): one demux pass
    counting packets that carry data (no decoding), then a seek back to the start."""
    n = sum(1 for packet in container.demux(stream) if packet.size)
    if n:
        container.seek(0)
    return n


def _decode_seeking(container, stream, wanted: list[int], rate: Fraction) -> dict[int, np.ndarray]:
    """The ``wanted`` frames (ascending indices) by seeking: for each target, seek to the
    keyframe at or before its time and decode forward until the frame whose index is the
    target. A frame's index is derived from its pts as
    ``round((pts - stream.start_time) * time_base * average_rate)`` (exact for constant
    frame rate streams). Nearby targets (``SEEK_GAP``) are reached by decoding on, without a
    seek. Memory holds the wanted frames only."""
    tb = Fraction(stream.time_base)
    start = stream.start_time or 0
    out, frames, pos = {}, None, None
    for target in wanted:
        seeked = frames is None or pos is None or target - pos > SEEK_GAP or target < pos
        if seeked:
            container.seek(start + math.floor(target / rate / tb), backward=True, any_frame=False, stream=stream)
            frames = container.decode(stream)
        first = True
        for frame in frames:
            if frame.pts is None:
                raise _Unseekable
            pos = round((frame.pts - start) * tb * rate)
            if pos > target and first and seeked:
                raise _Unseekable  # landed after the target: the index or the pts is off
            first = False
            if pos >= target:
                break
        else:
            frames = None
            continue  # end of stream: the caller reports the missing frame
        if pos > target:
            raise _Unseekable  # a pts gap (variable frame rate): count frames instead
        out[target] = frame.to_ndarray(format="rgb24")
    return out


def _decode_sequential(container, stream, wanted: list[int]) -> dict[int, np.ndarray]:
    """The ``wanted`` frames by decoding from the start, the index being decode order."""
    container.seek(0)
    keep, out = set(wanted), {}
    for i, frame in enumerate(container.decode(stream)):
        if i in keep:
            out[i] = frame.to_ndarray(format="rgb24")
        if i >= wanted[-1]:
            break
    return out


# --- preprocessing ----------------------------------------------------------------------


@dataclasses.dataclass
class ProcessedVideo(_GroupTokens):
    """One video ready for the vision graph."""

    pixel_values: np.ndarray  # [t*h*w, C*T*P*P] float32 (pixel_values_videos)
    grid_thw: tuple[int, int, int]  # video_grid_thw
    timestamps: tuple[float, ...]  # seconds, one per temporal group
    indices: tuple[int, ...]  # the sampled source frames
    fps: float  # the source's frame rate
    resized: tuple[int, int]  # (height, width) of every frame fed to the patcher
    merge_size: int = 2


def preprocess_video(video, cfg: VideoProcessorConfig | None = None, *, fps: float | None = None,
                     size: tuple[int, int] | None = None) -> ProcessedVideo:
    """Full preprocessing of a :class:`VideoClip` or of anything :func:`load_video` takes;
    ``size`` (height, width, multiples of ``patch * merge``) replaces the smart resize."""
    cfg = cfg or VideoProcessorConfig()
    clip = video if isinstance(video, VideoClip) else load_video(video, cfg, fps=fps)
    t, height, width, _ = clip.frames.shape
    if size is not None:
        rh, rw = size
    elif cfg.do_resize:
        rh, rw = smart_resize(t, height, width, cfg)
    elif height % cfg.factor or width % cfg.factor or t < cfg.temporal_patch_size:
        raise RuntimeInputError(
            f"video of {t} frames of {width}x{height} pixels: without resizing, sides must be multiples of {cfg.factor}"
            f" and there must be at least {cfg.temporal_patch_size} frames"
        )
    else:
        rh, rw = height, width
    x = np.stack([normalize(_resize(frame, rh, rw, cfg).transpose(2, 0, 1), cfg) for frame in clip.frames])
    pixel_values, grid = patchify(x, cfg)
    ts = timestamps(clip.indices, clip.fps, cfg.temporal_patch_size)
    return ProcessedVideo(pixel_values, grid, tuple(ts), tuple(int(i) for i in clip.indices), clip.fps, (rh, rw), cfg.merge_size)


def _resize(frame: np.ndarray, height: int, width: int, cfg: VideoProcessorConfig) -> np.ndarray:
    if frame.shape[:2] == (height, width):
        return frame
    return np.asarray(Image.fromarray(frame).resize((width, height), resample=cfg.resample), dtype=np.uint8)


def patchify(x: np.ndarray, cfg: VideoProcessorConfig) -> tuple[np.ndarray, tuple[int, int, int]]:
    """``[T, C, H, W]`` float32 -> ``([gt*gh*gw, C*Tp*P*P], (gt, gh, gw))``: T padded with
    the last frame to a multiple of ``Tp``; rows temporal group by group, then merge block
    by merge block (row-major), row-major inside a block; each row channel-major, then the
    ``Tp`` frames, then the P x P pixels (``Qwen3VLVideoProcessor.patchify``)."""
    tp, p, m = cfg.temporal_patch_size, cfg.patch_size, cfg.merge_size
    if pad := -x.shape[0] % tp:
        x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)])
    t, c, h, w = x.shape
    gt, gh, gw = t // tp, h // p, w // p
    patches = x.reshape(gt, tp, c, gh // m, m, p, gw // m, m, p).transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return np.ascontiguousarray(patches.reshape(gt * gh * gw, c * tp * p * p), dtype=np.float32), (gt, gh, gw)


# --- prompt -----------------------------------------------------------------------------


def video_placeholder(video: ProcessedVideo) -> str:
    """The text one ``<|video_pad|>`` expands to (``Qwen3VLProcessor.replace_video_token``):
    per temporal group ``<{t:.1f} seconds><|vision_start|>`` + pads + ``<|vision_end|>``."""
    pads = VIDEO_PAD * video.tokens_per_group
    return "".join(f"<{t:.1f} seconds>{VISION_START}{pads}{VISION_END}" for t in video.timestamps)


def expand_video_pads(text: str, videos) -> str:
    """Replace the i-th ``<|video_pad|>`` of the rendered chat text with
    :func:`video_placeholder` of ``videos[i]``; the template's ``<|vision_start|>`` /
    ``<|vision_end|>`` around it are kept, as transformers 5.24 does."""
    pieces = text.split(VIDEO_PAD)
    if len(pieces) - 1 != len(videos):
        raise RuntimeInputError(f"the prompt holds {len(pieces) - 1} video placeholders for {len(videos)} videos")
    return pieces[0] + "".join(video_placeholder(v) + rest for v, rest in zip(videos, pieces[1:]))
