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

from ..errors import RuntimeInputError
from .request import Sequence


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
    def __init__(self, engine, *, max_waiting: int | None = None):
        self.engine = engine
        self.max_waiting = max_waiting
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

    def _prefill(self, seq: Sequence) -> None:
        slot = len(self._active)
        p = seq.prepared
        t = time.perf_counter()
        seq.timings["queue_s"] = t - seq.t_start - sum(v for k, v in seq.timings.items() if k in ("preprocess_s", "vision_s", "embed_s"))
        try:
            logits = self.engine.prefill(slot, p.inputs_embeds, p.position_ids, p.deepstack_embeds)
            seq.timings["prefill_s"] = time.perf_counter() - t
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
            if last is not seq:
                self.engine.move(last.slot, i, last.length)
                last.slot = i
                self._active[i] = last
            seq.slot = None
