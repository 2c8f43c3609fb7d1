"""``Pipeline``: image(s) + prompt in, text out, from a compiled bundle.

    from qwen3vl_compile import Pipeline
    pipe = Pipeline.load("OUT")
    result = pipe.generate(images=["cat.jpg"], prompt="Describe this image")
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
from .vision import nearest_bucket


class Pipeline:
    """A bundle, served: one :class:`~.engine.Engine` (sessions and KV pool) and one
    :class:`~.scheduler.Scheduler` (batched decode). ``generate`` may be called from several
    threads at once, or several streams advanced in turn: each call gets the tokens it would
    get alone, and its own :class:`GenerationResult`. Up to ``max_batch`` requests decode
    together; more wait for a slot."""

    def __init__(self, root: Path, manifest: dict, *, threads: int = 0, on_miss: str = "fallback",
                 max_batch: int = 1, max_length: int | None = None, providers=("CPUExecutionProvider",), log=None,
                 vision_cache_mb: int = 256, max_waiting: int | None = None):
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
        self.image_token_id, self.video_token_id, self.merge = text.image_token_id, text.video_token_id, text.merge
        # Never generated (see Sampler): the image/video pads and <|vision_pad|>.
        self.placeholder_ids = {self.image_token_id, self.video_token_id, self.chat.tokenizer.token_to_id("<|vision_pad|>")}
        self.engine = Engine(self.files, typed, options, log=log)
        self.context_length = self.engine.max_length
        self.hidden = self.engine.hidden
        self.levels = self.engine.levels
        self.vision = self.engine.vision
        self.scheduler = Scheduler(self.engine, max_waiting=max_waiting)

    @classmethod
    def load(cls, root, *, threads: int = 0, on_miss: str = "fallback", skip_hash_check: bool = False,
             public_key=None, max_batch: int = 1, max_length: int | None = None,
             providers=("CPUExecutionProvider",), log=None, vision_cache_mb: int = 256,
             max_waiting: int | None = None) -> "Pipeline":
        """``public_key``: a PEM public key; the bundle must then carry a valid signature by its
        private key (``qwen3vl-compile sign``), checked before anything else is read.
        ``max_batch`` requests decode together (the KV pool's slots, of ``max_length`` tokens,
        default the bundle's context length); ``log`` receives the pool's size. Vision
        features are kept for ``vision_cache_mb`` MiB of images (by content, least recently
        used dropped first; 0: none), so a follow-up turn about an image skips the vision
        graph. More than ``max_waiting`` requests waiting for a slot: ``submit`` raises
        :class:`~.scheduler.QueueFull` (None: no limit)."""
        if not isinstance(root, (str, os.PathLike)):
            raise RuntimeInputError(f"Pipeline.load needs the bundle directory (a str or path), got {type(root).__name__}")
        check_threads(threads, "threads", RuntimeInputError)  # before any hashing
        if public_key is not None:
            from ..bundle.signing import verify as verify_signature

            verify_signature(Path(root), public_key)
            skip_hash_check = True  # every file was just hashed against the signed list
        manifest = open_checked(Path(root), skip_hash_check=skip_hash_check)
        return cls(Path(root), manifest, threads=threads, on_miss=on_miss, max_batch=max_batch, max_length=max_length,
                   providers=providers, log=log, vision_cache_mb=vision_cache_mb, max_waiting=max_waiting)

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
        exhausted; closing it early cancels the request)."""
        images = _check_api_inputs(images, prompt, system, max_new_tokens)
        sampling = SamplingConfig(temperature, top_k, top_p, seed)
        gen = GenerationStream(lambda: self.submit(images, prompt, system=system, max_new_tokens=int(max_new_tokens),
                                                   sampling=sampling))
        if stream:
            return gen
        for _ in gen:
            pass
        return gen.result

    def submit(self, images: Sequence = (), prompt: str = "", *, system: str | None = None, max_new_tokens: int = 128,
               sampling: SamplingConfig = SamplingConfig(), sink=None, messages=None) -> RequestSequence:
        """Prepare a request in the calling thread (preprocess, vision, embedding) and queue
        it for decoding; returns its :class:`~.request.Sequence` (read its events with
        ``pieces()`` / ``apieces()``, or give ``sink`` a callable that takes them).

        ``messages`` instead of ``images`` / ``prompt`` / ``system``: a multi-turn
        conversation ``[{"role": "system" | "user" | "assistant", "content": str | parts}]``,
        parts ``{"type": "text", "text": ...}`` and ``{"type": "image", "image": <path, PIL
        image or array>}``, rendered with the bundle's chat template (the answer continues
        it as the assistant)."""
        images, conversation = self._conversation(images, prompt, system, messages, max_new_tokens)
        t_start = time.perf_counter()
        prepared = self._prepare(images, conversation)
        seq = RequestSequence(
            prepared, sampler=Sampler(sampling, banned=self.placeholder_ids), stream=self.chat.stream(),
            stop_ids=self.chat.stop_ids, max_new_tokens=max_new_tokens, context_length=self.context_length,
            decode_text=self.chat.decode, t_start=t_start, sink=sink,
        )
        return self.scheduler.submit(seq)

    def check_request(self, images: Sequence = (), prompt: str = "", system: str | None = None, *,
                      messages=None) -> int:
        """The checks that need no model work: every image's header (readable, not too small
        or thin: the pixels are not decoded) and the prompt's token count with the image
        tokens those sizes give, against the bundle's context (:class:`ContextLengthError`).
        Returns that token count. ``messages``: as in :meth:`submit`."""
        images, conversation = self._conversation(images, prompt, system, messages, 1)
        counts = [self._header_tokens(image) for image in images]
        return self._check_context(self.chat.encode_messages(conversation, counts))

    def _conversation(self, images, prompt, system, messages, max_new_tokens) -> tuple[list, list[dict]]:
        """The request's images and its messages in the chat template's form."""
        if messages is None:
            images = _check_api_inputs(images, prompt, system, max_new_tokens)
            for name, text in (("prompt", prompt), ("system prompt", system or "")):
                check_no_pads(text, f"the {name}")
            return images, build_messages(prompt, len(images), system)
        if (isinstance(images, (list, tuple)) and images) or not isinstance(images, (list, tuple)) or prompt or system:
            raise RuntimeInputError("give either messages=[...] or images/prompt/system, not both")
        whole_number(max_new_tokens, "max_new_tokens", 1, RuntimeInputError)
        return template_messages(messages)

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

    def _check_context(self, input_ids) -> int:
        n_prompt = input_ids.shape[1]
        if n_prompt >= self.context_length:  # refused before any vision work
            raise ContextLengthError(
                f"prompt with image tokens is {n_prompt} tokens, longer than the bundle's context of {self.context_length}",
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

    def _encode_images(self, processed_all, info: list[dict], timings: dict) -> list:
        encoded = []
        for processed, entry in zip(processed_all, info):
            result = self.vision.encode(processed.pixel_values, processed.grid_thw)
            timings["vision_s"] += result.seconds
            encoded.append((processed, result))
            entry.update(served_by=result.served_by, vision_s=round(result.seconds, 4))
        return encoded

    def _prepare(self, images, conversation: list[dict]) -> Prepared:
        """Everything before the decoder, in the calling thread: images preprocessed (the
        context checked before any vision work), encoded, the prompt embedded, its positions."""
        images = list(images)
        # From the image headers first: an image too big for the context is refused before
        # its pixels are decoded (a 13000x13000 PNG is 500 MB of them).
        header_counts = [self._header_tokens(i) for i in images]
        input_ids = self.chat.encode_messages(conversation, header_counts)
        self._check_context(input_ids)
        processed, image_info, timings = self._preprocess_images(images)
        counts = [p.num_tokens for p in processed]
        if counts != header_counts:  # "fit" counted the smaller orientation's bucket
            input_ids = self.chat.encode_messages(conversation, counts)
            self._check_context(input_ids)
        encoded = self._encode_images(processed, image_info, timings)
        n_pads = int((input_ids == self.image_token_id).sum())
        n_rows = sum(r.image_features.shape[0] for _, r in encoded)
        if n_pads != n_rows:
            raise RuntimeInputError(f"prompt has {n_pads} image pad tokens but the images give {n_rows} feature rows")
        t = time.perf_counter()
        if encoded:
            feats = np.concatenate([r.image_features for _, r in encoded])
            deep = np.concatenate([r.deepstack for _, r in encoded], axis=1)
            embeds, deepstack = self.engine.embed(input_ids, feats, deep)
        else:
            embeds, deepstack = self.engine.embed(input_ids)
        grids = [list(p.grid_thw) for p, _ in encoded]
        positions, rope_deltas = get_rope_index(
            input_ids, grids or None, image_token_id=self.image_token_id, video_token_id=self.video_token_id,
            spatial_merge_size=self.merge,
        )
        timings["embed_s"] = time.perf_counter() - t
        return Prepared(input_ids, embeds, deepstack, positions, int(np.asarray(rope_deltas).reshape(-1)[0]),
                        image_info, timings)


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
