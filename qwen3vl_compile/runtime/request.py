"""One request's state, from its prompt to its result: nothing per request lives on the
engine or the pipeline.

A :class:`Sequence` is made by the pipeline once the request's images are preprocessed and
encoded and its prompt embedded (off the decode loop); the scheduler prefills it into a free
slot of the engine's KV pool, feeds it one token per batched decode step, and hands every
piece of text (then the result, or an error) to the request's own *sink*. Its consumer reads
them with :meth:`Sequence.pieces` (a generator; closing it cancels the request) or
:meth:`Sequence.apieces` (asyncio).
"""

from __future__ import annotations

import dataclasses
import itertools
import queue
import threading
import time
from typing import AsyncIterator, Callable, Iterator

import numpy as np

from ..errors import GenerationError
from .sampling import Sampler

_ids = itertools.count(1)


@dataclasses.dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    images: list[dict]
    timings: dict[str, float]
    stopped: str  # "stop_token" | "max_new_tokens" | "context" | "cancelled"
    videos: list[dict] = dataclasses.field(default_factory=list)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Prepared:
    """What a request brings to the engine: its prompt embedded, DeepStack rows, MRoPE
    positions and rope delta, and what preprocessing measured."""

    input_ids: np.ndarray  # [1, S]
    inputs_embeds: np.ndarray  # [1, S, H]
    deepstack_embeds: np.ndarray  # [K, 1, S, H]
    position_ids: np.ndarray  # [3, 1, S]
    rope_delta: int
    images: list[dict]
    timings: dict[str, float]
    videos: list[dict] = dataclasses.field(default_factory=list)
    # The prompt as the KV cache sees it ([S] int64): token ids, media pads replaced by values
    # of the media's content (see Pipeline._prefix_key); None: never shares its cache.
    prefix_key: np.ndarray | None = None


# Events a sequence sends to its consumer: ("text", str), ("done", GenerationResult),
# ("error", Exception).
Event = tuple[str, object]


def _piece(event: Event) -> str | None:
    """The text of a ``text`` event; None at ``done``; an ``error`` event's error raised."""
    kind, value = event
    if kind == "text":
        return value
    if kind == "done":
        return None
    raise value


class Sequence:
    """Everything one request needs while it decodes: token ids, cache length, rope delta,
    slot, sampler (its own seeded generator), stream decoder, stop ids, token budget,
    timings and result."""

    def __init__(self, prepared: Prepared, *, sampler: Sampler, stream, stop_ids, max_new_tokens: int,
                 context_length: int, decode_text: Callable[[list[int]], str], t_start: float | None = None,
                 sink: Callable[[Event], None] | None = None):
        self.id = next(_ids)
        self.prepared = prepared
        self.prompt_tokens = int(prepared.input_ids.shape[1])
        self.sampler = sampler
        self.stream = stream
        self.stop_ids = frozenset(stop_ids)
        self.budget = min(max_new_tokens, context_length - self.prompt_tokens)
        self.limit_reason = "max_new_tokens" if self.budget == max_new_tokens else "context"
        self._decode_text = decode_text
        self.t_start = time.perf_counter() if t_start is None else t_start
        self.timings = dict(prepared.timings)
        self.length = 0  # tokens in this sequence's cache
        self.slot: int | None = None
        self.next_token: int | None = None  # sampled, not yet in the cache
        self.out_ids: list[int] = []
        self.result: GenerationResult | None = None
        self.error: BaseException | None = None
        self._cancelled = threading.Event()
        self._finished = threading.Event()
        self._queue: queue.Queue | None = None
        if sink is None:
            self._queue = queue.Queue()
            sink = self._queue.put
        self._sink = sink
        self._t_decode: float | None = None

    # -- the consumer's side ----------------------------------------------------------------
    def cancel(self) -> None:
        """Stop this request at the next step; its slot is freed and its result says
        ``stopped="cancelled"``."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def finished(self) -> bool:
        return self._finished.is_set()

    def pieces(self) -> Iterator[str]:
        """The text as it is generated; the result is then :attr:`result`. Closing the
        generator early cancels the request."""
        try:
            while (piece := _piece(self._events().get())) is not None:
                yield piece
        finally:
            if not self.finished:
                self.cancel()

    async def apieces(self) -> AsyncIterator[str]:
        """:meth:`pieces` for asyncio: waiting for the next event does not block the loop."""
        import asyncio

        try:
            while (piece := _piece(await asyncio.to_thread(self._events().get))) is not None:
                yield piece
        finally:
            if not self.finished:
                self.cancel()

    def _events(self) -> queue.Queue:
        if self._queue is None:
            raise RuntimeError("this sequence sends its events to a sink of its own")
        return self._queue

    def wait_finished(self, timeout: float | None = None) -> bool:
        """Block until the scheduler has finished, cancelled or failed this request."""
        return self._finished.wait(timeout)

    def wait(self) -> GenerationResult:
        """Block until the request ends; its result, or its error raised."""
        for _ in self.pieces():
            pass
        return self.result

    # -- the scheduler's side ---------------------------------------------------------------
    def cache_key(self) -> np.ndarray | None:
        """What this sequence's ``length`` cached tokens are: its prompt's prefix key, then
        the generated tokens fed back (None when the prompt has no key)."""
        key = self.prepared.prefix_key
        if key is None or self.error is not None:
            return None
        fed = np.asarray(self.out_ids[: max(0, self.length - self.prompt_tokens)], np.int64)
        return np.concatenate([key, fed])[: self.length]

    def accept(self, logits_row: np.ndarray) -> None:
        """Sample the next token from this sequence's last logits; stream it, or finish."""
        if self._t_decode is None:
            now = time.perf_counter()
            self.timings["time_to_first_token_s"] = now - self.t_start
            self._t_decode = now
        if not np.isfinite(logits_row).all():
            raise GenerationError(
                f"step {len(self.out_ids)}: the decoder returned NaN or inf logits; the bundle computes garbage "
                "(files changed after compile, or an overflow): run `qwen3vl-compile verify` on it")
        token = self.sampler(logits_row)
        if token in self.stop_ids:
            self.finish("stop_token")
            return
        self.out_ids.append(token)
        piece = self.stream.push(token)
        if piece:
            self._sink(("text", piece))
        if len(self.out_ids) >= self.budget:
            self.finish(self.limit_reason)
        else:
            self.next_token = token

    def finish(self, stopped: str) -> None:
        if self.finished:
            return
        tail = self.stream.finish()
        if tail:
            self._sink(("text", tail))
        t = self.timings
        now = time.perf_counter()
        decode_s = now - self._t_decode if self._t_decode is not None else 0.0
        t["decode_s"] = decode_s
        n = len(self.out_ids)
        t["decode_tokens_per_s"] = (n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0
        t["total_s"] = now - self.t_start
        self.result = GenerationResult(
            text=self._decode_text(self.out_ids),
            token_ids=list(self.out_ids),
            prompt_tokens=self.prompt_tokens,
            images=self.prepared.images,
            timings={k: round(v, 4) for k, v in t.items()},
            stopped=stopped,
            videos=self.prepared.videos,
        )
        self.next_token = None
        self._finished.set()
        self._sink(("done", self.result))

    def fail(self, error: BaseException) -> None:
        if self.finished:
            return
        self.error = error
        self.next_token = None
        self._finished.set()
        self._sink(("error", error))
