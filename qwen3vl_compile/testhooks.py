"""Test-only pause points, so that tests can send a real signal at an exact step.

``QWEN3VL_COMPILE_TEST_PAUSE=STEP:FILE`` makes :func:`pause` at ``STEP`` create ``FILE`` and
wait (at most 60 s) until the test removes it. Unset (always, outside the tests), ``pause``
returns at once. Steps: see ``bundle/writer.py`` (``commit``, ``old-made``, ``swap``,
``cleanup``, ``cleanup-mid``, ``committed``) and ``cli_io.py`` (``atexit``).
"""

from __future__ import annotations

import os
import time

ENV = "QWEN3VL_COMPILE_TEST_PAUSE"


def pause(step: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    name, _, path = spec.partition(":")
    if name != step or not path:
        return
    with open(path, "w"):
        pass
    deadline = time.monotonic() + 60
    while os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.02)
