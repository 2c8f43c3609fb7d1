"""``Pipeline``: image(s) + prompt in, text out, from a compiled bundle.

    from qwen3vl_compile import Pipeline
    pipe = Pipeline.load("OUT")
    result = pipe.generate(images=["cat.jpg"], prompt="Describe this image")
    for piece in pipe.generate(images=[...], prompt=..., stream=True): print(piece, end="")

Dependencies for bucketed image sizes: onnxruntime, numpy, Pillow, tokenizers, jinja2. torch
and transformers are imported only when an image takes the PyTorch fallback.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..bundle.check import open_checked
from ..bundle.manifest import BundleFiles
from ..options import check_threads, whole_number
from .session import ort_session
from ..errors import BundleError, GenerationError, RuntimeInputError
from .decoder_session import DecoderSession
from .preprocess import load_image, preprocess
from .rope_index import decode_positions, get_rope_index
from .sampling import Sampler, SamplingConfig
from .text_side import TextSide
from .vision import VisionEncoder, nearest_bucket


@dataclasses.dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    images: list[dict]
    timings: dict[str, float]
    stopped: str  # "stop_token" | "max_new_tokens" | "context"

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


class Pipeline:
    def __init__(self, root: Path, manifest: dict, *, threads: int = 0, on_miss: str = "fallback"):
        check_threads(threads, "threads", RuntimeInputError)

        self.root = Path(root)
        self.manifest = manifest
        self.threads = threads
        graphs = manifest.get("graphs", {})
        for needed in ("embedding", "decoder"):
            if needed not in graphs:
                raise BundleError(f"{root}: the bundle has no {needed} graph (compiled with --graphs?)")
        # Every file is read through the manifest's list: a file it does not list is never opened.
        self.files = BundleFiles.of_manifest(self.root, manifest)
        text = TextSide.load(self.files, manifest.get("processor") or {})
        self.config, self.processor, self.chat = text.config, text.processor, text.chat
        self.image_token_id, self.video_token_id, self.merge = text.image_token_id, text.video_token_id, text.merge
        # Never generated (see Sampler): the image/video pads and <|vision_pad|>.
        self.placeholder_ids = {self.image_token_id, self.video_token_id, self.chat.tokenizer.token_to_id("<|vision_pad|>")}

        def session(path):
            return ort_session(path, threads)

        self._session = session
        self.embedding = session(self.files.path(graphs["embedding"]["file"]))
        spec = graphs["decoder"]["spec"]
        self.context_length = int(spec["context_length"])
        self.hidden = int(spec["hidden"])
        self.levels = int(spec["deepstack_levels"])
        decoder = self.files.path(graphs["decoder"]["file"])
        self.decoder = DecoderSession(decoder, max_length=self.context_length, session=session(decoder))
        self.vision = VisionEncoder(self.files, manifest, session, on_miss=on_miss)
        self.last_result: GenerationResult | None = None

    @classmethod
    def load(cls, root, *, threads: int = 0, on_miss: str = "fallback", skip_hash_check: bool = False,
             public_key=None) -> "Pipeline":
        """``public_key``: a PEM public key; the bundle must then carry a valid signature by its
        private key (``qwen3vl-compile sign``), checked before anything else is read."""
        check_threads(threads, "threads", RuntimeInputError)  # before any hashing
        if public_key is not None:
            from ..bundle.signing import verify as verify_signature

            verify_signature(Path(root), public_key)
            skip_hash_check = True  # every file was just hashed against the signed list
        manifest = open_checked(Path(root), skip_hash_check=skip_hash_check)
        return cls(Path(root), manifest, threads=threads, on_miss=on_miss)

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
        images = _check_api_inputs(images, prompt, system, max_new_tokens)
        gen = self._generate(images, prompt, system, max_new_tokens, SamplingConfig(temperature, top_k, top_p, seed))
        if stream:
            return gen
        for _ in gen:
            pass
        return self.last_result

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

    def _generate(self, images, prompt: str, system, max_new_tokens: int, sampling: SamplingConfig) -> Iterator[str]:
        t_start = time.perf_counter()
        sampler = Sampler(sampling, banned=self.placeholder_ids)
        processed, image_info, timings = self._preprocess_images(list(images))
        input_ids = self.chat.encode(prompt, [p.num_tokens for p in processed], system)
        n_prompt = input_ids.shape[1]
        if n_prompt >= self.context_length:  # refused before any vision work
            raise RuntimeInputError(
                f"prompt with image tokens is {n_prompt} tokens, longer than the bundle's context of {self.context_length}"
            )
        encoded = self._encode_images(processed, image_info, timings)
        n_pads = int((input_ids == self.image_token_id).sum())
        n_rows = sum(r.image_features.shape[0] for _, r in encoded)
        if n_pads != n_rows:
            raise RuntimeInputError(f"prompt has {n_pads} image pad tokens but the images give {n_rows} feature rows")
        feats = np.concatenate([r.image_features for _, r in encoded]) if encoded else np.zeros((0, self.hidden), np.float32)
        deep = np.concatenate([r.deepstack for _, r in encoded], axis=1) if encoded else np.zeros((self.levels, 0, self.hidden), np.float32)
        t = time.perf_counter()
        embeds, deepstack = self.embedding.run(
            ["inputs_embeds", "deepstack_embeds"],
            {"input_ids": input_ids, "image_features": feats.astype(np.float32), "deepstack_features": deep.astype(np.float32)},
        )
        grids = [list(p.grid_thw) for p, _ in encoded]
        positions, rope_deltas = get_rope_index(
            input_ids, grids or None, image_token_id=self.image_token_id, video_token_id=self.video_token_id,
            spatial_merge_size=self.merge,
        )
        self.decoder.reset()
        logits = self.decoder.run(embeds, positions, deepstack)
        timings["prefill_s"] = time.perf_counter() - t
        timings["time_to_first_token_s"] = time.perf_counter() - t_start
        budget = min(max_new_tokens, self.context_length - n_prompt)
        out_ids: list[int] = []
        stream = self.chat.stream()
        stopped = "max_new_tokens" if budget == max_new_tokens else "context"
        t_dec = time.perf_counter()
        no_images = (np.zeros((0, self.hidden), np.float32), np.zeros((self.levels, 0, self.hidden), np.float32))
        while True:
            if not np.isfinite(logits[0, -1]).all():
                raise GenerationError(
                    f"step {len(out_ids)}: the decoder returned NaN or inf logits; the bundle computes garbage "
                    "(files changed after compile, or an overflow): run `qwen3vl-compile verify` on it")
            token = sampler(logits[0, -1])
            if token in self.chat.stop_ids:
                stopped = "stop_token"
                break
            out_ids.append(token)
            piece = stream.push(token)
            if piece:
                yield piece
            if len(out_ids) >= budget:
                break
            step_embeds, _ = self.embedding.run(
                ["inputs_embeds", "deepstack_embeds"],
                {"input_ids": np.array([[token]], np.int64), "image_features": no_images[0], "deepstack_features": no_images[1]},
            )
            pos = decode_positions(self.decoder.length, rope_deltas)
            logits = self.decoder.run(step_embeds, pos)
        tail = stream.finish()
        if tail:
            yield tail
        decode_s = time.perf_counter() - t_dec
        timings["decode_s"] = decode_s
        timings["decode_tokens_per_s"] = (len(out_ids) - 1) / decode_s if len(out_ids) > 1 and decode_s > 0 else 0.0
        timings["total_s"] = time.perf_counter() - t_start
        self.last_result = GenerationResult(
            text=self.chat.decode(out_ids),
            token_ids=out_ids,
            prompt_tokens=n_prompt,
            images=image_info,
            timings={k: round(v, 4) for k, v in timings.items()},
            stopped=stopped,
        )


def _check_api_inputs(images, prompt, system, max_new_tokens) -> list:
    """The Python API's argument types, each refused with what was expected."""
    if isinstance(images, (str, Path, np.ndarray)) or not isinstance(images, (list, tuple)):
        raise RuntimeInputError(f"images must be a list (or tuple) of paths, PIL images or arrays, got "
                                f"{type(images).__name__}; for one image write images=[...]")
    if not isinstance(prompt, str):
        raise RuntimeInputError(f"prompt must be a string, got {type(prompt).__name__}")
    if system is not None and not isinstance(system, str):
        raise RuntimeInputError(f"system must be a string or None, got {type(system).__name__}")
    whole_number(max_new_tokens, "max_new_tokens", 1, RuntimeInputError)
    return list(images)
