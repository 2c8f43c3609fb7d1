"""The scheduler: admits requests between decode steps, decodes every active sequence in one
batched step, streams each sequence's text to its own consumer, frees finished slots.

One background thread owns the engine's decoder and KV pool. Its loop:

1. drop waiting requests that were cancelled; admit waiting ones into free slots, one
   prefill each (their images were preprocessed, encoded and embedded by the submitting
   thread, off this loop), and sample their first token;
2. one batched decode step for all active sequences (slots ``[0, n)``), sampling per row
   with each sequence's own sampler;
3. evict sequences that finished (stop token, budget), were cancelled or failed; the last
   active sequence moves into the freed slot, so the active slots stay contiguous.

**Prefix reuse**: a freed slot keeps its sequence's cache (prompt and generated tokens, with
the key that names them: token ids, media pads named by the media's content). A new request
whose prompt starts with a kept cache's tokens (the next turn of a conversation: the same
messages and images, the answer, a new question) has that prefix copied into its slot and
prefills only the rest. Kept caches are overwritten as slots are needed; when the freed slot
is refilled by the last active sequence, the two slots are swapped so the freed cache survives.

A request waits while every slot is busy. An error in one sequence (NaN logits in its row)
fails that sequence only; an error of the decoder run itself fails the sequences of that
run. :meth:`Scheduler.submit` is safe from any thread; the consumer reads the sequence's
events from a generator or from asyncio (see :class:`~.request.Sequence`).
"""

from __future__ import annotations

import atexit
import collections
import threading
import time
import weakref

import numpy as np

from ..errors import RuntimeInputError
from .request import Sequence


# Shorter shared prefixes are prefilled again: the copy would save too little.
MIN_REUSED_TOKENS = 16


class QueueFull(RuntimeInputError):
    """Every slot is busy and the waiting queue is at its limit."""

    stage = "engine"


# Every scheduler with a live thread: stopped at interpreter exit (requests cancelled, thread
# joined), so that no decoder run is still inside ONNX Runtime while Python tears down (that
# aborts the process: "terminate called without an active exception").
_live: "weakref.WeakSet[Scheduler]" = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    for scheduler in list(_live):
        scheduler.close(timeout=0)


class Scheduler:
    def __init__(self, engine, *, max_waiting: int | None = None, reuse_prefix: bool = True):
        self.engine = engine
        self.max_waiting = max_waiting
        self.reuse_prefix = reuse_prefix
        self._kept: dict[int, np.ndarray] = {}  # free slot -> the key of the tokens it caches
        self.reused_tokens = 0  # prompt tokens taken from kept caches instead of prefilled
        self._cv = threading.Condition()
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._active: list[Sequence] = []  # index = slot
        self._thread: threading.Thread | None = None
        self._closed = False
        self.steps = 0  # batched decode steps run
        self.tokens = 0  # tokens generated
        self.peak_active = 0  # the most sequences decoded together so far

    # -- any thread -------------------------------------------------------------------------
    def submit(self, seq: Sequence) -> Sequence:
        with self._cv:
            if self._closed:
                raise RuntimeInputError("the engine is shut down; no new requests", stage="engine")
            # Requests a free slot takes at the next admission are not waiting for one.
            free = max(0, self.engine.max_batch - len(self._active))
            if self.max_waiting is not None and len(self._waiting) >= self.max_waiting + free:
                waiting = len(self._waiting) - free
                raise QueueFull(f"every slot is busy and {waiting} request(s) already wait for one (the limit)")
            self._waiting.append(seq)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="qwen3vl-scheduler", daemon=True)
                self._thread.start()
                _live.add(self)
            self._cv.notify()
        return seq

    @property
    def active(self) -> int:
        return len(self._active)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def close(self, timeout: float | None = None) -> None:
        """Refuse new requests, let the submitted ones finish (cancelled after ``timeout``
        seconds if given; ``timeout=0`` cancels them at once), stop the thread."""
        with self._cv:
            self._closed = True
            self._cv.notify()
            thread = self._thread
        if thread is None:
            return
        thread.join(timeout)
        if thread.is_alive():
            with self._cv:
                for seq in [*self._waiting, *self._active]:
                    seq.cancel()
                self._cv.notify()
            thread.join()

    # -- the scheduler's thread -------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                with self._cv:
                    while not self._waiting and not self._active and not self._closed:
                        self._cv.wait()
                    if self._closed and not self._waiting and not self._active:
                        return
                    for seq in [s for s in self._waiting if s.cancelled]:
                        self._waiting.remove(seq)
                        seq.finish("cancelled")
                    admitted = []
                    while self._waiting and len(self._active) + len(admitted) < self.engine.max_batch:
                        admitted.append(self._waiting.popleft())
                for seq in admitted:
                    self._prefill(seq)
                self._evict()
                if self._active:
                    self._step()
                    self._evict()
        except BaseException as e:  # pragma: no cover - a bug in this loop: fail everyone, never hang
            with self._cv:
                self._closed = True
                for seq in [*self._waiting, *self._active]:
                    seq.fail(e)
                self._waiting.clear()
                self._active.clear()
            raise

    def _reusable(self, seq: Sequence, slot: int) -> int:
        """Tokens of ``seq``'s prompt found cached in a kept slot, copied into ``slot`` (0: none;
        at least one prompt token is always left to prefill, for its logits)."""
        key = seq.prepared.prefix_key
        if not self.reuse_prefix or key is None or not self._kept:
            return 0
        best, source = 0, None
        for kept_slot, kept in self._kept.items():
            n = min(len(kept), len(key) - 1)
            same = np.flatnonzero(kept[:n] != key[:n])
            common = int(same[0]) if same.size else n
            if common > best:
                best, source = common, kept_slot
        if best < MIN_REUSED_TOKENS:
            return 0
        if source != slot:
            self.engine.move(source, slot, best)
        return best

    def _prefill(self, seq: Sequence) -> None:
        slot = len(self._active)
        p = seq.prepared
        t = time.perf_counter()
        seq.timings["queue_s"] = t - seq.t_start - sum(v for k, v in seq.timings.items() if k in ("preprocess_s", "vision_s", "embed_s"))
        try:
            reused = self._reusable(seq, slot)
            self._kept.pop(slot, None)
            logits = self.engine.prefill(slot, p.inputs_embeds[:, reused:], p.position_ids[:, :, reused:],
                                         p.deepstack_embeds[:, :, reused:], offset=reused)
            seq.timings["prefill_s"] = time.perf_counter() - t
            seq.timings["prefix_reused_tokens"] = reused
            self.reused_tokens += reused
            seq.slot, seq.length = slot, seq.prompt_tokens
            self._active.append(seq)  # a failed sequence is evicted with the finished ones
            self.peak_active = max(self.peak_active, len(self._active))
            seq.accept(logits)
        except Exception as e:
            seq.fail(e)
        self.tokens += len(seq.out_ids)

    def _step(self) -> None:
        seqs = self._active
        try:
            logits = self.engine.decode([s.next_token for s in seqs], [s.length for s in seqs],
                                        [s.prepared.rope_delta for s in seqs])
        except Exception as e:
            for s in seqs:
                s.fail(e)
            return
        self.steps += 1
        for row, s in enumerate(seqs):
            s.length += 1
            if s.cancelled:
                continue
            before = len(s.out_ids)
            try:
                s.accept(logits[row])
            except Exception as e:
                s.fail(e)
            self.tokens += len(s.out_ids) - before

    def _evict(self) -> None:
        """Free the slots of finished, failed and cancelled sequences, keeping the active ones
        in slots [0, n)."""
        for i in range(len(self._active) - 1, -1, -1):
            seq = self._active[i]
            if seq.cancelled and not seq.finished:
                seq.finish("cancelled")
            if not seq.finished:
                continue
            last = self._active.pop()
            key = seq.cache_key() if self.reuse_prefix else None
            if last is not seq:
                if key is not None:  # keep the freed cache: it goes where the last one was
                    self.engine.swap(i, last.slot, seq.length, last.length)
                    self._kept[last.slot] = key
                else:
                    self.engine.move(last.slot, i, last.length)
                last.slot = i
                self._active[i] = last
            elif key is not None:
                self._kept[i] = key
            seq.slot = None
