"""Progress for long steps: shown on a terminal, quiet in CI and pipes.

``Progress.stage("export vision 448")`` is a context manager that prints the stage and its
duration on stderr when stderr is a TTY (or when forced with ``verbose=True``); otherwise it
only records timings, which end up in the manifest.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Iterator


class Progress:
    def __init__(self, *, enabled: bool | None = None, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.timings: dict[str, float] = {}
        self._t0 = time.perf_counter()

    def log(self, message: str) -> None:
        if self.enabled:
            print(f"[{time.perf_counter() - self._t0:7.1f}s] {message}", file=self.stream, flush=True)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.log(f"{name} ...")
        t = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t
            self.timings[name] = round(dt, 3)
            self.log(f"{name}: {dt:.1f}s")
