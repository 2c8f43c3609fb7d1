"""What every vision graph shares, bucketed or any-size: one export path, one reference,
one verify loop.

- :func:`export_graph`: torch.onnx (dynamo) under a patch set, the vision pass list, the
  save (weights as external data above ``EXTERNAL_DATA_THRESHOLD``); returns the graph's
  :class:`~qwen3vl_compile.bundle.records.GraphEntry`. A failed export raises a one-line
  :class:`~qwen3vl_compile.errors.ExportError` naming the file (``export_log_path``) that
  holds the exporter's whole log and the traceback.
- :func:`reference_outputs`: the *unpatched* Hugging Face tower, fp32, the oracle of every
  vision graph.
- :func:`measure_cases`: run a graph and the reference on each case, measure every output,
  keep one case's inputs and reference outputs as the bundle's golden.

Every vision graph returns ``image_features [tokens, out_hidden]`` and
``deepstack_features [K, tokens, out_hidden]`` (``OUTPUT_NAMES``).
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, ContextManager, Iterable, Sequence

import numpy as np

from ..bundle.goldens import pixel_values_from_u8
from ..bundle.records import GraphEntry, TensorInfo
from ..errors import ExportError
from ..parity import TOLERANCES, measure

OUTPUT_NAMES = ["image_features", "deepstack_features"]
EXTERNAL_DATA_THRESHOLD = 256 << 20


@contextlib.contextmanager
def quiet_exporter(log: io.StringIO):
    """torch.onnx prints progress to stdout and warnings through logging: keep them in ``log``."""
    import logging
    import warnings

    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(log), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def export_log_path(name: str) -> Path:
    """Where a failed export of graph ``name`` leaves the exporter's log."""
    return Path(tempfile.gettempdir()) / f"qwen3vl-compile-export-{name}-{os.getpid()}.log"


def _export_failed(name: str, error: Exception, log: str) -> ExportError:
    """Errors are one line: the exception's first line, and the file that holds the
    exporter's whole log and the traceback."""
    path = export_log_path(name)
    trace = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    try:
        path.write_text(f"torch.onnx.export of {name} failed\n\n-- exporter log --\n{log}\n-- traceback --\n{trace}")
        where = f"exporter log: {path}"
    except OSError as e:
        where = f"exporter log not written to {path}: {e.strerror}"
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    first = (lines[0] if lines else "(no message)") + (" ..." if len(lines) > 1 else "")
    return ExportError(f"{name}: torch.onnx.export failed: {type(error).__name__}: {first} ({where})")


def feature_outputs(levels: int, tokens, out_hidden: int) -> list[TensorInfo]:
    """The two outputs every vision graph has; ``tokens`` is a size or a symbolic name."""
    return [
        TensorInfo("image_features", "float32", (tokens, out_hidden)),
        TensorInfo("deepstack_features", "float32", (levels, tokens, out_hidden)),
    ]


def export_graph(
    module,
    example_args: tuple,
    *,
    name: str,
    out_dir: Path,
    patches: ContextManager[list[str]],
    input_names: Sequence[str],
    inputs: list[TensorInfo],
    outputs: list[TensorInfo],
    details: dict,
    dynamic_shapes=None,
    export_facts: dict | None = None,
    check: Callable | None = None,
    passes=None,
    precision: str = "fp32",
) -> GraphEntry:
    """Export ``module`` on ``example_args`` under ``patches`` (a context manager yielding the
    names of the patches it applied), run ``check(model)`` on the exported model if given,
    then the vision passes for ``precision`` (``passes`` replaces that list), and save ``<name>.onnx`` in
    ``out_dir``.

    The entry's details are ``details``, then ``export`` (the exporter, ``export_facts``, the
    export's seconds) and ``patches``."""
    import onnx_ir as ir
    import torch

    from qwen3vl_compile.passes import vision_passes
    from qwen3vl_compile.passes.base import run_passes

    log = io.StringIO()
    t0 = time.perf_counter()
    try:
        with quiet_exporter(log), patches as patch_names:
            program = torch.onnx.export(
                module,
                example_args,
                dynamo=True,
                input_names=list(input_names),
                output_names=OUTPUT_NAMES,
                dynamic_shapes=dynamic_shapes,
                optimize=True,
                verbose=False,
            )
    except Exception as e:  # noqa: BLE001 - re-raised typed, in one line; the log goes to a file
        raise _export_failed(name, e, log.getvalue()) from e
    seconds = time.perf_counter() - t0
    model = program.model
    model.graph.name = name
    if check is not None:
        check(model)
    model, reports = run_passes(model, vision_passes(precision) if passes is None else passes, graph=name)
    path = Path(out_dir) / f"{name}.onnx"
    size = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    data_files = []
    if size > EXTERNAL_DATA_THRESHOLD:
        ir.save(model, path, external_data=f"{name}.onnx.data")
        data_files.append(f"{name}.onnx.data")
    else:
        ir.save(model, path)
    exporter = "torch.onnx.export(dynamo=True{}) torch {}".format(
        ", dynamic_shapes" if dynamic_shapes is not None else "", torch.__version__
    )
    return GraphEntry(
        file=path.name,
        kind="vision",
        precision=precision,
        inputs=inputs,
        outputs=outputs,
        data_files=data_files,
        passes=reports,
        details={
            **details,
            "export": {"exporter": exporter, **(export_facts or {}), "seconds": round(seconds, 2)},
            "patches": patch_names,
        },
    )


def random_pixel_u8(num_patches: int, patch_dim: int, seed: int) -> np.ndarray:
    """Seeded uniform uint8 patch values, the form a vision golden stores its input in."""
    return np.random.default_rng(seed).integers(0, 256, size=(num_patches, patch_dim), dtype=np.uint8)


def split_outputs(image_features: np.ndarray, deepstack: np.ndarray) -> dict[str, np.ndarray]:
    """A graph's two outputs as parity measures them: ``image_features``, ``deepstack_<k>``."""
    out = {"image_features": image_features}
    for k in range(deepstack.shape[0]):
        out[f"deepstack_{k}"] = deepstack[k]
    return out


def reference_outputs(visual, pixel_values: np.ndarray, grid_thw) -> dict[str, np.ndarray]:
    """The unpatched Hugging Face vision tower, fp32, in one call on ``pixel_values`` packed
    as ``grid_thw`` describes: one ``(t, h, w)`` or a sequence of them (several images)."""
    import torch

    grids = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
    with torch.no_grad():
        out = visual(torch.from_numpy(pixel_values), grid_thw=torch.from_numpy(grids))
    return split_outputs(out.pooler_output.numpy(), torch.stack(list(out.deepstack_features)).numpy())


def golden_outputs(ref: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A reference in the graph's own output form (DeepStack levels stacked), for a golden."""
    levels = [v for k, v in ref.items() if k.startswith("deepstack_")]
    return {"image_features": ref["image_features"], "deepstack_features": np.stack(levels)}


def measure_cases(
    run: Callable[[np.ndarray, dict], tuple[np.ndarray, np.ndarray]],
    visual,
    cases: Iterable[tuple[str, dict, object]],
    *,
    golden: str,
    precision: str = "fp32",
) -> tuple[dict, dict]:
    """Measure a vision graph against the reference, case by case.

    ``cases``: ``(name, inputs, reference_grids)`` with ``inputs`` the golden's input arrays
    (``pixel_u8`` first, then any other graph input); ``run(pixel_values, inputs)`` returns
    the graph's two outputs. Returns the measured cases and the golden: the inputs and
    reference outputs of the case named ``golden``. The reference runs once per case; the
    tolerance is the gate of the graph's ``precision``."""
    tol = TOLERANCES[("vision", precision)]
    measured, kept = {}, {}
    for name, inputs, grids in cases:
        x = pixel_values_from_u8(inputs["pixel_u8"])
        actual = split_outputs(*run(x, inputs))
        ref = reference_outputs(visual, x, grids)
        # A reduced precision also records each output's lowest per-row (per-token) cosine.
        measured[name] = [measure(k, actual.get(k), ref[k], tol, cosine=precision != "fp32") for k in ref]
        if name == golden:
            kept = {**inputs, **golden_outputs(ref)}
    return measured, kept
