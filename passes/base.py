"""What every pass in this package shares: a result that carries counts, and a runner that
collects each pass's report (a ``PassReport``) for the bundle manifest.

Passes subclass onnx-ir's ``InPlacePass`` (or ``FunctionalPass``) and return a
:class:`ReportedPassResult`. :func:`run_passes` runs an ordered tuple of passes with our own
loop (onnx-ir's composers would rebuild a plain ``PassResult`` and drop the counts) and turns
any exception into a :class:`~qwen3vl_compile.errors.PassError` naming the failing pass and
the ones that ran before it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Sequence

import onnx_ir as ir

from qwen3vl_compile.bundle.records import PassReport
from qwen3vl_compile.errors import PassError

logger = logging.getLogger("qwen3vl_compile.passes")


@dataclasses.dataclass
class ReportedPassResult(ir.passes.PassResult):
    """``PassResult`` plus ``stats``: what the pass changed, as small JSON-able counts."""

    stats: dict[str, Any] = dataclasses.field(default_factory=dict)


def run_passes(
    model: ir.Model, passes: Sequence[ir.passes.PassBase], *, graph: str = ""
) -> tuple[ir.Model, list[PassReport]]:
    """Run ``passes`` in order; return the final model and one :class:`PassReport` per pass."""
    reports: list[PassReport] = []
    done: list[str] = []
    for p in passes:
        name = type(p).__name__
        t0 = time.perf_counter()
        try:
            result = p(model)
        except Exception as e:  # noqa: BLE001 - re-raised typed, with context
            before = ", ".join(done) or "none"
            raise PassError(f"{graph + ': ' if graph else ''}pass {name} failed ({type(e).__name__}: {e}); passes run before it: {before}") from e
        model = result.model
        stats = dict(getattr(result, "stats", {}) or {})
        reports.append(PassReport(name, bool(result.modified), stats, round(time.perf_counter() - t0, 3)))
        if result.modified:
            logger.info("%s%s changed the model: %s", f"{graph}: " if graph else "", name, stats)
        done.append(name)
    return model, reports
