"""The engine: a bundle's ONNX Runtime sessions and one KV pool, shared by every request.

Built from one frozen :class:`EngineOptions` (threads, execution providers, ``max_batch``,
``max_length``, the image-size policy), validated once. The pool holds ``max_batch`` slots
of ``max_length`` tokens per layer (see :mod:`qwen3vl_compile.ort.decoder_session`); its size
is computed, printed and checked against the memory this machine has available *before* anything is
allocated. The engine offers:

- :meth:`Engine.embed`: token ids (+ image rows) to input embeddings (thread-safe: any
  thread may prepare a prompt while the scheduler decodes);
- :meth:`Engine.prefill`: one sequence's prompt into one slot;
- :meth:`Engine.decode`: one batched step for the sequences in slots ``[0, n)``: one
  embedding call, one decoder run, per-row cache lengths and MRoPE positions;
- :meth:`Engine.move`: a sequence's cache from one slot to another (the scheduler keeps the
  active sequences in the first slots, so a step is always one contiguous run).

Per-request state lives on :class:`~.request.Sequence`, never here. Only the scheduler's
thread calls ``prefill``, ``decode`` and ``move``.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from ..bundle.records import BundleManifest
from ..errors import BundleError, RuntimeInputError
from ..options import whole_number
from ..ort.decoder_session import DecoderPool
from .rope_index import decode_positions
from ..ort.session import ort_session
from .vision import ON_MISS, VisionEncoder

GIB = 1024**3
# The pool may take at most this share of the memory available when it is made: the
# sessions' weights and activations need the rest.
POOL_MEMORY_SHARE = 0.8


@dataclasses.dataclass(frozen=True)
class EngineOptions:
    """How a bundle is served. ``max_length`` None = the bundle's context length."""

    threads: int = 0
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    max_batch: int = 1
    max_length: int | None = None
    on_miss: str = "fallback"
    vision_cache_mb: int = 256  # vision features kept by image content (0: no cache)

    def __post_init__(self):
        whole_number(self.threads, "threads", 0, RuntimeInputError)
        whole_number(self.max_batch, "max_batch", 1, RuntimeInputError)
        whole_number(self.vision_cache_mb, "vision_cache_mb", 0, RuntimeInputError)
        if self.max_length is not None:
            whole_number(self.max_length, "max_length", 2, RuntimeInputError)
        if self.on_miss not in ON_MISS:
            raise RuntimeInputError(f"--on-miss {self.on_miss!r}: choose one of {', '.join(ON_MISS)}")
        providers = self.providers
        if isinstance(providers, str) or not isinstance(providers, (tuple, list)) or not providers \
                or not all(isinstance(p, str) for p in providers):
            raise RuntimeInputError(f"providers must be a non-empty list of provider names, got {providers!r}")
        object.__setattr__(self, "providers", tuple(providers))


def available_memory() -> int | None:
    """Bytes of memory available for new allocations (Linux MemAvailable), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


class Engine:
    def __init__(self, files, manifest: BundleManifest | dict, options: EngineOptions = EngineOptions(), *, log=None):
        """``files``: the bundle's BundleFiles (only the files its manifest lists are opened);
        ``manifest``: its manifest, typed or as read."""
        self.files = files
        self.root = files.root
        self.options = options
        self._log = log or (lambda msg: None)
        manifest = BundleManifest.of(manifest)
        graphs = manifest.graphs
        for needed in ("embedding", "decoder"):
            if needed not in graphs:
                raise BundleError(f"{self.root}: the bundle has no {needed} graph (compiled with --graphs?)")
        unknown = [p for p in options.providers if p not in _available_providers()]
        if unknown:
            raise RuntimeInputError(f"execution provider {unknown[0]!r} is not in this onnxruntime "
                                    f"(available: {', '.join(_available_providers())})", stage="engine")
        spec = graphs["decoder"].spec
        self.context_length = spec.context_length
        self.hidden = spec.hidden
        self.levels = spec.deepstack_levels
        max_length = options.max_length or self.context_length
        if max_length > self.context_length:
            raise RuntimeInputError(f"max_length {max_length} is above the bundle's context length {self.context_length} "
                                    "(its rotary table)", stage="engine")
        self.max_length = max_length
        self.max_batch = options.max_batch
        self.embedding = self.session(files.path(graphs["embedding"].file))
        decoder_file = files.path(graphs["decoder"].file)
        self.pool = DecoderPool(decoder_file, max_batch=self.max_batch, max_length=max_length,
                                session=self.session(decoder_file), before_allocate=self._check_pool)
        self.vision = VisionEncoder(files, manifest, self.session, on_miss=options.on_miss,
                                    cache_bytes=int(options.vision_cache_mb) * 2**20)
        self._no_images = (np.zeros((0, self.hidden), np.float32), np.zeros((self.levels, 0, self.hidden), np.float32))

    def session(self, path):
        try:
            return ort_session(path, self.options.threads, providers=self.options.providers)
        except Exception as e:  # onnxruntime's own types (InvalidProtobuf, Fail, ...)
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise BundleError(f"{path}: ONNX Runtime cannot load this graph ({first}); the file is damaged: "
                              "run `qwen3vl-compile verify` on the bundle") from None

    def _check_pool(self, pool: DecoderPool) -> None:
        """Print the pool's size; refuse one that does not fit, before it is allocated."""
        need = pool.nbytes
        self.pool_description = (f"KV pool: {pool.max_batch} slot(s) x {pool.max_length} tokens x {pool.num_layers} layers "
                                 f"({pool.kv_heads} KV heads of {pool.head_dim}), {need / GIB:.2f} GiB float32")
        have = available_memory()
        if have is not None and need > POOL_MEMORY_SHARE * have:
            raise RuntimeInputError(
                f"the KV pool of {pool.max_batch} slot(s) x {pool.max_length} tokens needs {need / GIB:.2f} GiB, more than "
                f"{POOL_MEMORY_SHARE:.0%} of the {have / GIB:.2f} GiB available: lower max_batch or max_length",
                stage="engine")
        self._log(self.pool_description)

    # -- any thread -------------------------------------------------------------------------
    def embed(self, input_ids: np.ndarray, image_features=None, deepstack_features=None):
        """``input_ids [B, S]`` -> ``(inputs_embeds [B, S, H], deepstack_embeds [K, B, S, H])``,
        image rows scattered onto the image pads."""
        feats, deep = self._no_images if image_features is None else (image_features, deepstack_features)
        return self.embedding.run(
            ["inputs_embeds", "deepstack_embeds"],
            {"input_ids": np.asarray(input_ids, np.int64), "image_features": np.asarray(feats, np.float32),
             "deepstack_features": np.asarray(deep, np.float32)},
        )

    # -- the scheduler's thread -------------------------------------------------------------
    def prefill(self, slot: int, inputs_embeds, position_ids, deepstack_embeds, offset: int = 0) -> np.ndarray:
        """A prompt into ``slot`` after the ``offset`` tokens it already caches (0: an empty
        slot); the logits of its last position ``[vocab]``."""
        logits = self.pool.run(slot, [offset], inputs_embeds, position_ids, deepstack_embeds)
        return logits[0, -1]

    def swap(self, a: int, b: int, length_a: int, length_b: int) -> None:
        self.pool.swap(a, b, length_a, length_b)

    def decode(self, tokens, lengths, rope_deltas) -> np.ndarray:
        """One step for slots ``[0, n)``: ``tokens[r]`` appended after ``lengths[r]`` cached
        tokens; logits ``[n, vocab]``."""
        ids = np.asarray(tokens, np.int64).reshape(-1, 1)
        embeds, _ = self.embed(ids)
        positions = np.concatenate([decode_positions(length, delta) for length, delta in zip(lengths, rope_deltas)], axis=1)
        logits = self.pool.run(0, lengths, embeds, positions)
        return logits[:, -1]

    def move(self, src: int, dst: int, length: int) -> None:
        self.pool.move(src, dst, length)


def _available_providers() -> list[str]:
    import onnxruntime as ort

    return ort.get_available_providers()
