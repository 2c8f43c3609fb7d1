"""``Pipeline``: image(s) + prompt in, text out, from a compiled bundle.

    from qwen3vl_compile import Pipeline
    pipe = Pipeline.load("OUT")
    result = pipe.generate(images=["cat.jpg"], prompt="Describe this image")
    result = pipe.generate(videos=["clip.mp4"], prompt="What happens?")   # the [video] extra
    for piece in pipe.generate(images=[...], prompt=..., stream=True): print(piece, end="")

Dependencies for bucketed image sizes: onnxruntime, numpy, Pillow, tokenizers, jinja2. torch
and transformers are imported only when an image takes the PyTorch fallback.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from ..bundle.check import open_checked
from ..bundle.manifest import BundleFiles
from ..bundle.records import BundleManifest
from ..options import check_threads, whole_number
from ..errors import ContextLengthError, RuntimeInputError
from .chat import build_messages, check_no_pads, template_messages
from .engine import Engine, EngineOptions
from .preprocess import grid_for_size, image_size, load_image, preprocess
from .request import GenerationResult, Prepared
from .request import Sequence as RequestSequence
from .rope_index import get_rope_index
from .sampling import Sampler, SamplingConfig
from .scheduler import Scheduler
from .text_side import TextSide
from .video import Video, VideoPlan, VideoProcessorConfig, plan_video, preprocess_video
from .vision import nearest_bucket


class Pipeline:
    """A bundle, served: one :class:`~.engine.Engine` (sessions and KV pool) and one
    :class:`~.scheduler.Scheduler` (batched decode). ``generate`` may be called from several
    threads at once, or several streams advanced in turn: each call gets the tokens it would
    get alone, and its own :class:`GenerationResult`. Up to ``max_batch`` requests decode
    together; more wait for a slot."""

    def __init__(self, root: Path, manifest: dict, *, threads: int = 0, on_miss: str = "fallback",
                 max_batch: int = 1, max_length: int | None = None, providers=("CPUExecutionProvider",), log=None,
                 vision_cache_mb: int = 256, max_waiting: int | None = None, video_fps: float | None = None,
                 max_frames: int | None = None, video_max_pixels: int | None = None, reuse_prefix: bool = True):
        check_threads(threads, "threads", RuntimeInputError)
        threads = int(threads)  # a numpy integer too
        options = EngineOptions(threads=threads, providers=providers, max_batch=max_batch, max_length=max_length,
                                on_miss=on_miss, vision_cache_mb=vision_cache_mb)
        if max_waiting is not None:
            whole_number(max_waiting, "max_waiting", 0, RuntimeInputError)
        self.root = Path(root)
        self.manifest = manifest
        self.options = options
        typed = BundleManifest.of(manifest)  # read once; the engine and the vision side share it
        # Every file is read through the manifest's list: a file it does not list is never opened.
        self.files = BundleFiles.of_manifest(self.root, manifest)
        text = TextSide.load(self.files, typed.processor)
        self.config, self.processor, self.chat = text.config, text.processor, text.chat
        # Video sampling and sizes: the checkpoint's video_preprocessor_config.json (the class
        # defaults when the bundle has none), with this load's overrides.
        self.video_processor = _video_config(self.files).with_overrides(
            fps=video_fps, max_frames=max_frames, max_pixels=video_max_pixels)
        self.image_token_id, self.video_token_id, self.merge = text.image_token_id, text.video_token_id, text.merge
        # Never generated (see Sampler): the image/video pads and <|vision_pad|>.
        self.placeholder_ids = {self.image_token_id, self.video_token_id, self.chat.tokenizer.token_to_id("<|vision_pad|>")}
        self.engine = Engine(self.files, typed, options, log=log)
        self.context_length = self.engine.max_length
        self.hidden = self.engine.hidden
        self.levels = self.engine.levels
        self.vision = self.engine.vision
        self.scheduler = Scheduler(self.engine, max_waiting=max_waiting, reuse_prefix=bool(reuse_prefix))

    @classmethod
    def load(cls, root, *, threads: int = 0, on_miss: str = "fallback", skip_hash_check: bool = False,
             public_key=None, max_batch: int = 1, max_length: int | None = None,
             providers=("CPUExecutionProvider",), log=None, vision_cache_mb: int = 256,
             max_waiting: int | None = None, video_fps: float | None = None, max_frames: int | None = None,
             video_max_pixels: int | None = None, reuse_prefix: bool = True) -> "Pipeline":
        """``public_key``: a PEM public key; the bundle must then carry a valid signature by its
        private key (``qwen3vl-compile sign``), checked before anything else is read.
        ``max_batch`` requests decode together (the KV pool's slots, of ``max_length`` tokens,
        default the bundle's context length); ``log`` receives the pool's size. Vision
        features are kept for ``vision_cache_mb`` MiB of images (by content, least recently
        used dropped first; 0: none), so a follow-up turn about an image skips the vision
        graph. More than ``max_waiting`` requests waiting for a slot: ``submit`` raises
        :class:`~.scheduler.QueueFull` (None: no limit). ``video_fps`` (frames sampled per
        second), ``max_frames`` and ``video_max_pixels`` (all frames together) replace the
        checkpoint's video settings. ``reuse_prefix``: a request whose prompt starts with what
        a finished request's slot still caches (the next turn of a conversation) prefills
        only the rest (see :mod:`.scheduler`)."""
        if not isinstance(root, (str, os.PathLike)):
            raise RuntimeInputError(f"Pipeline.load needs the bundle directory (a str or path), got {type(root).__name__}")
        check_threads(threads, "threads", RuntimeInputError)  # before any hashing
        if public_key is not None:
            from ..bundle.signing import verify as verify_signature

            verify_signature(Path(root), public_key)
            skip_hash_check = True  # every file was just hashed against the signed list
        manifest = open_checked(Path(root), skip_hash_check=skip_hash_check)
        return cls(Path(root), manifest, threads=threads, on_miss=on_miss, max_batch=max_batch, max_length=max_length,
                   providers=providers, log=log, vision_cache_mb=vision_cache_mb, max_waiting=max_waiting,
                   video_fps=video_fps, max_frames=max_frames, video_max_pixels=video_max_pixels,
                   reuse_prefix=reuse_prefix)

    def close(self, timeout: float | None = None) -> None:
        """Finish the requests in flight (cancelled after ``timeout`` seconds) and stop."""
        self.scheduler.close(timeout)

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        # On an error nobody will read the requests still in flight: cancel them.
        self.close(timeout=0 if exc_type is not None else None)

    # -- public API ------------------------------------------------------------------
    def generate(
        self,
        images: Sequence = (),
        prompt: str = "",
        *,
        videos: Sequence = (),
        system: str | None = None,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stream: bool = False,
    ):
        """The answer as a :class:`GenerationResult`; with ``stream=True`` a
        :class:`GenerationStream` of text pieces (its ``result`` is set once it is
        exhausted; closing it early cancels the request). ``videos``: file paths (the
        ``video`` extra reads them) or :class:`~.video.Video` records of in-memory frames
        with their fps; they follow the images in the prompt."""
        images = _check_api_inputs(images, prompt, system, max_new_tokens)
        videos = _check_videos(videos)
        sampling = SamplingConfig(temperature, top_k, top_p, seed)
        gen = GenerationStream(lambda: self.submit(images, prompt, videos=videos, system=system,
                                                   max_new_tokens=int(max_new_tokens), sampling=sampling))
        if stream:
            return gen
        for _ in gen:
            pass
        return gen.result

    def submit(self, images: Sequence = (), prompt: str = "", *, videos: Sequence = (), system: str | None = None,
               max_new_tokens: int = 128, sampling: SamplingConfig = SamplingConfig(), sink=None,
               messages=None) -> RequestSequence:
        """Prepare a request in the calling thread (preprocess, vision, embedding) and queue
        it for decoding; returns its :class:`~.request.Sequence` (read its events with
        ``pieces()`` / ``apieces()``, or give ``sink`` a callable that takes them).

        ``messages`` instead of ``images`` / ``videos`` / ``prompt`` / ``system``: a multi-turn
        conversation ``[{"role": "system" | "user" | "assistant", "content": str | parts}]``,
        parts ``{"type": "text", "text": ...}``, ``{"type": "image", "image": <path, PIL
        image or array>}`` and ``{"type": "video", "video": <path or Video>}``, rendered with
        the bundle's chat template (the answer continues it as the assistant)."""
        media, conversation = self._conversation(images, videos, prompt, system, messages, max_new_tokens)
        t_start = time.perf_counter()
        prepared = self._prepare(media, conversation)
        seq = RequestSequence(
            prepared, sampler=Sampler(sampling, banned=self.placeholder_ids), stream=self.chat.stream(),
            stop_ids=self.chat.stop_ids, max_new_tokens=max_new_tokens, context_length=self.context_length,
            decode_text=self.chat.decode, t_start=t_start, sink=sink,
        )
        return self.scheduler.submit(seq)

    def check_request(self, images: Sequence = (), prompt: str = "", system: str | None = None, *,
                      videos: Sequence = (), messages=None) -> int:
        """The checks that need no model work: every image's header (readable, not too small
        or thin: the pixels are not decoded), every video's header (frames, rate and size:
        no frame decoded) and the prompt's token count with the image and video tokens those
        give, against the bundle's context (:class:`ContextLengthError`). Returns that token
        count. ``messages``: as in :meth:`submit`."""
        media, conversation = self._conversation(images, videos, prompt, system, messages, 1)
        counts = [self._header_tokens(v) for k, v in media if k == "image"]
        plans = [self._video_plan(v) for k, v in media if k == "video"]
        return self._check_context(self.chat.encode_messages(conversation, counts, plans), plans)

    def _conversation(self, images, videos, prompt, system, messages, max_new_tokens
                      ) -> tuple[list[tuple[str, object]], list[dict]]:
        """The request's media in prompt order (``("image" | "video", value)``) and its
        messages in the chat template's form."""
        if messages is None:
            images = _check_api_inputs(images, prompt, system, max_new_tokens)
            videos = _check_videos(videos)
            for name, text in (("prompt", prompt), ("system prompt", system or "")):
                check_no_pads(text, f"the {name}")
            media = [("image", i) for i in images] + [("video", v) for v in videos]
            return media, build_messages(prompt, len(images), system, num_videos=len(videos))
        if (isinstance(images, (list, tuple)) and images) or not isinstance(images, (list, tuple)) or prompt or system \
                or not isinstance(videos, (list, tuple)) or videos:
            raise RuntimeInputError("give either messages=[...] or images/videos/prompt/system, not both")
        whole_number(max_new_tokens, "max_new_tokens", 1, RuntimeInputError)
        media, conversation = template_messages(messages)
        return [(k, Video.of(v, "a video part") if k == "video" else v) for k, v in media], conversation

    def _header_tokens(self, image) -> int:
        """Image tokens of ``image`` from its size alone (an exact count, or in ``fit`` mode
        for a size with no bucket, the smaller of its two orientations' buckets)."""
        height, width = image_size(image)
        try:
            grid = grid_for_size(height, width, self.processor)
        except RuntimeInputError as e:  # too small or too thin: name the file
            if isinstance(image, (str, os.PathLike)):
                raise RuntimeInputError(f"{str(image)!r}: {e.args[0]}") from None
            raise
        if self.vision.bucket_for_grid(grid) is None and self.vision.on_miss == "fit" and self.vision.buckets:
            grids = [nearest_bucket(self.vision.buckets, h, w).grid_thw for h, w in ((height, width), (width, height))]
            return min(_tokens(g, self.processor.merge_size) for g in grids)
        return _tokens(grid, self.processor.merge_size)

    def _video_plan(self, video: Video) -> VideoPlan:
        """What ``video`` becomes, from its header: sampled frames, size, grid, timestamps.
        With ``on_miss="fit"``, frames whose grid has no bucket are planned at the nearest
        bucket's size."""
        plan = plan_video(video, self.video_processor)
        if self.vision.bucket_for_grid((1, *plan.grid_thw[1:])) is None and self.vision.on_miss == "fit" \
                and self.vision.buckets:
            b = nearest_bucket(self.vision.buckets, *plan.original)
            plan = plan_video(video, self.video_processor, size=(b.height, b.width))
        return plan

    def _check_context(self, input_ids, videos: Sequence[VideoPlan] = ()) -> int:
        n_prompt = input_ids.shape[1]
        if n_prompt >= self.context_length:  # refused before any vision work
            what = "image and video" if videos else "image"
            hint = ""
            if videos:
                frames = ", ".join(f"{len(v.indices)} frames of {v.resized[1]}x{v.resized[0]} = {v.num_tokens} tokens"
                                   for v in videos)
                hint = f" (videos: {frames}); lower --max-frames, --video-fps or --video-max-pixels"
            raise ContextLengthError(
                f"prompt with {what} tokens is {n_prompt} tokens, longer than the bundle's context of "
                f"{self.context_length}{hint}",
                prompt_tokens=n_prompt, context_length=self.context_length,
            )
        return n_prompt

    # -- steps ------------------------------------------------------------------------
    def _preprocess_images(self, images) -> tuple[list, list[dict], dict]:
        """Decode, resize and patch every image (no vision graph yet): the token count is
        known before any expensive work."""
        processed_all, info, timings = [], [], {"preprocess_s": 0.0, "vision_s": 0.0}
        for i, image in enumerate(images):
            t = time.perf_counter()
            pil = load_image(image)
            processed = preprocess(pil, self.processor)
            entry = {"index": i}
            if self.vision.bucket_for_grid(processed.grid_thw) is None and self.vision.on_miss == "fit":
                b = nearest_bucket(self.vision.buckets, *processed.original)
                processed = preprocess(pil, self.processor, size=(b.height, b.width))
                entry["fit"] = f"resized from {processed.original[1]}x{processed.original[0]} to bucket {b.name}"
            timings["preprocess_s"] += time.perf_counter() - t
            processed_all.append(processed)
            info.append({**entry, "grid_thw": list(processed.grid_thw), "tokens": processed.num_tokens})
        return processed_all, info, timings

    def _encode(self, processed_all, info: list[dict], timings: dict, encode) -> list:
        """``(processed, VisionResult)`` of each image (``encode``: the vision side's
        ``encode``) or video (``encode_video``); its entry of ``info`` records what served it."""
        encoded = []
        for processed, entry in zip(processed_all, info):
            result = encode(processed.pixel_values, processed.grid_thw)
            timings["vision_s"] += result.seconds
            encoded.append((processed, result))
            entry.update(served_by=result.served_by, vision_s=round(result.seconds, 4))
        return encoded

    def _preprocess_videos(self, videos: list[Video], plans: list[VideoPlan], timings: dict) -> tuple[list, list[dict]]:
        """Decode each video's sampled frames, resize them to its plan's size and patch them."""
        processed, info = [], []
        for i, (video, plan) in enumerate(zip(videos, plans)):
            t = time.perf_counter()
            size = plan.resized if plan.fitted else None
            pv = preprocess_video(video.source, self.video_processor, fps=video.fps, size=size)
            if pv.grid_thw != plan.grid_thw or pv.indices != plan.indices:
                raise RuntimeInputError(f"video {video.describe()}: decoded as grid {list(pv.grid_thw)} from "
                                        f"{len(pv.indices)} frames, its header said {list(plan.grid_thw)}")
            timings["preprocess_s"] = timings.get("preprocess_s", 0.0) + time.perf_counter() - t
            processed.append(pv)
            entry = {"index": i, "grid_thw": list(pv.grid_thw), "tokens": pv.num_tokens, "frames": len(pv.indices),
                     "fps": round(pv.fps, 3), "timestamps": list(pv.timestamps)}
            if size is not None:
                entry["fit"] = f"frames resized from {plan.original[1]}x{plan.original[0]} to {size[1]}x{size[0]}"
            info.append(entry)
        return processed, info

    def _prepare(self, media: list[tuple[str, object]], conversation: list[dict]) -> Prepared:
        """Everything before the decoder, in the calling thread: images and videos
        preprocessed (the context checked from their headers before any pixel is decoded or
        any vision work), encoded, the prompt embedded, its positions."""
        images = [v for k, v in media if k == "image"]
        videos = [v for k, v in media if k == "video"]
        # From the headers first: an image too big for the context is refused before its
        # pixels are decoded (a 13000x13000 PNG is 500 MB of them), a video before any frame is.
        header_counts = [self._header_tokens(i) for i in images]
        plans = [self._video_plan(v) for v in videos]
        input_ids = self.chat.encode_messages(conversation, header_counts, plans)
        self._check_context(input_ids, plans)
        processed, image_info, timings = self._preprocess_images(images)
        counts = [p.num_tokens for p in processed]
        if counts != header_counts:  # "fit" counted the smaller orientation's bucket
            input_ids = self.chat.encode_messages(conversation, counts, plans)
            self._check_context(input_ids, plans)
        pvideos, video_info = self._preprocess_videos(videos, plans, timings)
        encoded_images = iter(self._encode(processed, image_info, timings, self.vision.encode))
        encoded_videos = iter(self._encode(pvideos, video_info, timings, self.vision.encode_video))
        # Rows in prompt order: the embedding graph fills image and video pads in turn.
        encoded = [next(encoded_images) if k == "image" else next(encoded_videos) for k, _ in media]
        n_pads = int(np.isin(input_ids, (self.image_token_id, self.video_token_id)).sum())
        n_rows = sum(r.image_features.shape[0] for _, r in encoded)
        if n_pads != n_rows:
            raise RuntimeInputError(f"prompt has {n_pads} image and video pad tokens but the media give {n_rows} feature rows")
        t = time.perf_counter()
        if encoded:
            feats = np.concatenate([r.image_features for _, r in encoded])
            deep = np.concatenate([r.deepstack for _, r in encoded], axis=1)
            embeds, deepstack = self.engine.embed(input_ids, feats, deep)
        else:
            embeds, deepstack = self.engine.embed(input_ids)
        positions, rope_deltas = get_rope_index(
            input_ids, [list(p.grid_thw) for p in processed] or None, [list(v.grid_thw) for v in pvideos] or None,
            image_token_id=self.image_token_id, video_token_id=self.video_token_id, spatial_merge_size=self.merge,
        )
        timings["embed_s"] = time.perf_counter() - t
        media_keys = [(r.content_key, r.image_features.shape[0]) for _, r in encoded]
        return Prepared(input_ids, embeds, deepstack, positions, int(np.asarray(rope_deltas).reshape(-1)[0]),
                        image_info, timings, video_info,
                        prefix_key=_prefix_key(input_ids, (self.image_token_id, self.video_token_id), media_keys))


class GenerationStream:
    """The text pieces of one ``generate(..., stream=True)`` call. The request starts at the
    first ``next()``; :attr:`result` is this call's :class:`GenerationResult` once the
    stream is exhausted; ``close()`` before that cancels the request (its slot is freed at
    the next decode step)."""

    def __init__(self, start):
        self._start = start
        self._seq: RequestSequence | None = None
        self._pieces = None
        self._closed = False

    def __iter__(self):
        return self

    def __next__(self) -> str:
        if self._closed:
            raise StopIteration
        if self._pieces is None:
            self._seq = self._start()
            self._pieces = self._seq.pieces()
        return next(self._pieces)

    def close(self) -> None:
        """Cancel the request and wait for the scheduler to stop it (at its next step): then
        :attr:`result` holds what was generated, ``stopped="cancelled"``."""
        self._closed = True
        if self._pieces is not None:
            self._pieces.close()
            self._seq.wait_finished()

    @property
    def result(self) -> GenerationResult | None:
        """This call's result: None until the stream ends (or when it was closed before its
        request started); after ``close()``, the partial result."""
        return None if self._seq is None else self._seq.result


def _check_api_inputs(images, prompt, system, max_new_tokens) -> list:
    """The Python API's argument types, each refused with what was expected."""
    if isinstance(images, (str, Path, np.ndarray)) or not isinstance(images, (list, tuple)):
        raise RuntimeInputError(f"images must be a list (or tuple) of paths, PIL images or arrays, got "
                                f"{type(images).__name__}; for one image write images=[...]")
    if not isinstance(prompt, str):
        hint = " (decode the bytes first: prompt=data.decode('utf-8'))" if isinstance(prompt, (bytes, bytearray)) else ""
        raise RuntimeInputError(f"prompt must be a string, got {type(prompt).__name__}{hint}")
    if system is not None and not isinstance(system, str):
        raise RuntimeInputError(f"system must be a string or None, got {type(system).__name__}")
    for name, text in (("prompt", prompt), ("system prompt", system or "")):
        check_text(text, name)
    whole_number(max_new_tokens, "max_new_tokens", 1, RuntimeInputError)
    return list(images)


def _prefix_key(input_ids: np.ndarray, pad_ids, media: list[tuple[bytes, int]]) -> np.ndarray | None:
    """The prompt as the KV cache sees it: its token ids, with the pads of each image or video
    (``media``: its content hash and pad count, in prompt order) replaced by negative values
    made of that hash and the pad's index, never a token id. Two prompts share a key prefix
    only where their caches would be the same (same tokens, same pixels). None (never shared)
    when a media's content is unknown."""
    if any(not digest for digest, _ in media):
        return None
    key = np.asarray(input_ids[0], np.int64).copy()
    pads = np.flatnonzero(np.isin(key, pad_ids))
    start = 0
    for digest, n in media:
        base = int.from_bytes(digest[:5], "little") << 22  # < 2**62; 2**22 pads per image or video
        key[pads[start:start + n]] = -(1 + base + np.arange(n, dtype=np.int64))
        start += n
    return key


def _check_videos(videos) -> list[Video]:
    """``videos=``: a list of paths or :class:`~.video.Video` records."""
    if isinstance(videos, (str, Path, np.ndarray, Video)) or not isinstance(videos, (list, tuple)):
        raise RuntimeInputError(f"videos must be a list (or tuple) of paths or Video(frames, fps=...) records, got "
                                f"{type(videos).__name__}; for one video write videos=[...]")
    return [Video.of(v, f"videos[{i}]") for i, v in enumerate(videos)]


def _video_config(files) -> VideoProcessorConfig:
    """The bundle's ``video_preprocessor_config.json`` (when its manifest lists one), else the
    video processor's defaults."""
    from ..jsonio import read_json_object
    from ..errors import BundleError

    path = files.find("video_preprocessor_config.json")
    if path is None:
        return VideoProcessorConfig()
    return VideoProcessorConfig.from_dict(read_json_object(path, BundleError))


def check_text(text: str, name: str) -> None:
    """Refuse text that is not valid Unicode: a command-line argument holding bytes that are
    not UTF-8 arrives as lone surrogates (U+DC80..U+DCFF), as does a JSON "\\ud800"."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start]
        what = f"the byte 0x{ord(bad) - 0xDC00:02x}, not UTF-8" if 0xDC80 <= ord(bad) <= 0xDCFF else f"a lone surrogate U+{ord(bad):04X}"
        raise RuntimeInputError(f"the {name} is not valid UTF-8 text: character {e.start} is {what}") from None


def _tokens(grid_thw, merge_size: int) -> int:
    t, h, w = (int(v) for v in grid_thw)
    return t * h * w // merge_size**2
