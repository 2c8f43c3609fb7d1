"""Build ``decoder.onnx``: the Qwen3-VL text decoder with DeepStack, in one call.

:func:`build_decoder` is the public entry point. Its stages, each timed in the report:

1. **build**: :func:`~qwen3vl_compile.export.text_decoder.build_decoder_model` lays out the
   graph with onnx-ir (ONNX Runtime contrib ops: SkipSimplifiedLayerNormalization,
   MRotaryEmbedding interleaved, GroupQueryAttention, MatMulNBits). Weights are
   ``ir.LazyTensor`` objects: nothing is read from the checkpoint yet.
2. **passes**: the decoder's pass tuple (:func:`qwen3vl_compile.passes.decoder_passes`):
   ``InsertDeepStackPass`` adds ``deepstack_embeds [K, B, S, H]`` and one Add after each
   of layers 0..K-1 (left out when ``deepstack=False``).
3. **save**: one ``.onnx`` plus one ``.onnx.data``. Each lazy weight is read from the
   safetensors file, converted to fp32 (one tensor only), quantized or cast, written and
   dropped: peak memory is about the largest tensor (the tied embedding / lm_head for a
   real model) plus ONNX Runtime's quantizer scratch, not the model.

The report (a JSON-able dict) carries the options, the graph's inputs and outputs as they
are in the saved file, sizes on disk, per-stage seconds and the peak resident memory
sampled while building.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnx_ir as ir

from ..model.checkpoint import Checkpoint
from ..errors import ExportError, Qwen3VLCompileError
from ..bundle.manifest import interface_name
from ..bundle.records import GraphEntry, TensorInfo
from ..options import DecoderOptions
from .text_decoder import build_decoder_model, save_streaming

# Written into the model's metadata_props; DecoderSession reads them back.
META_PREFIX = "qwen3vl_compile."


def build_decoder(
    checkpoint: Checkpoint,
    out_path: Path,
    options: DecoderOptions | None = None,
    *,
    deepstack: bool = True,
    layers: int | None = None,
    progress: Callable[[str], None] | None = None,
    **fields,
) -> GraphEntry:
    """Write ``out_path`` (``decoder.onnx``) and ``out_path.name + '.data'``; return its
    manifest entry.

    ``options``: a :class:`~qwen3vl_compile.options.DecoderOptions` (precision, block size,
    accuracy level, lm_head, logits, context length); keyword ``fields`` override single
    options (``precision="fp32"``), validated by the same object.
    ``layers``: only the first ``layers`` text layers (the parity gate's truncated slice).
    """
    options = (options or DecoderOptions()).replace(**fields)
    precision, logits = options.precision, options.logits
    from ..passes import decoder_passes
    from ..passes.base import run_passes
    from ..passes.insert_deepstack import InsertDeepStackPass

    out_path = Path(out_path)
    log = progress or (lambda _msg: None)
    seconds: dict[str, float] = {}
    writing = False
    with _PeakRSS() as rss:
        try:
            t = time.perf_counter()
            model, spec = build_decoder_model(checkpoint, options, layers=layers)
            seconds["build"] = time.perf_counter() - t

            t = time.perf_counter()
            if deepstack and spec.deepstack_levels == 0:
                raise ExportError("deepstack=True but the checkpoint's vision_config has no deepstack_visual_indexes")
            passes = tuple(p for p in decoder_passes(spec) if deepstack or not isinstance(p, InsertDeepStackPass))
            model, reports = run_passes(model, passes, graph="decoder")
            seconds["passes"] = time.perf_counter() - t

            levels = spec.deepstack_levels if deepstack else 0
            model.metadata_props.update(
                {
                    META_PREFIX + "graph": "decoder",
                    META_PREFIX + "precision": precision,
                    META_PREFIX + "context_length": str(spec.context_length),
                    META_PREFIX + "deepstack_levels": str(levels),
                    META_PREFIX + "logits": logits,
                }
            )
            interface = graph_interface(model.graph)

            t = time.perf_counter()
            out_path.parent.mkdir(parents=True, exist_ok=True)
            log(f"writing {out_path.name} ({precision}, {spec.layers} layers)")
            writing = True
            data_files = save_streaming(model, out_path, progress=log)
            del model
            seconds["save"] = time.perf_counter() - t
        except BaseException as e:
            # A half-written model is worse than none: remove what this call wrote.
            for partial in (out_path, out_path.with_name(out_path.name + ".data")) if writing else ():
                partial.unlink(missing_ok=True)
            if isinstance(e, Qwen3VLCompileError) or not isinstance(e, Exception):
                raise
            raise ExportError(f"building {out_path.name} failed: {type(e).__name__}: {e}") from e

    sizes = {name: (out_path.parent / name).stat().st_size for name in [out_path.name, *data_files]}
    seconds["total"] = sum(seconds.values())
    return GraphEntry(
        file=out_path.name,
        kind="decoder",
        precision=precision,
        inputs=interface["inputs"],
        outputs=interface["outputs"],
        data_files=data_files,
        passes=reports,
        details={
            "quantization": options.quantization,
            "logits": logits,
            "deepstack_levels": levels,
            "spec": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(spec).items()},
            "sizes": {**sizes, "total": sum(sizes.values())},
            "seconds": {k: round(v, 3) for k, v in seconds.items()},
            "rss_before_bytes": rss.start,
            "peak_rss_bytes": rss.peak,
            "build": {"builder": "qwen3vl-compile onnx-ir decoder builder (weights streamed)"},
        },
    )


def graph_interface(graph: ir.Graph) -> dict:
    """Inputs and outputs as saved, with past/present folded to one ``{i}`` entry each."""

    def describe(values) -> list[TensorInfo]:
        out, seen = [], set()
        for v in values:
            name = interface_name(v.name)
            if name in seen:
                continue
            seen.add(name)
            shape = tuple(d if isinstance(d, int) else str(d) for d in v.shape) if v.shape is not None else None
            dtype = str(np.dtype(v.dtype.numpy())) if v.dtype is not None else None
            out.append(TensorInfo(name, dtype, shape))
        return out

    return {"inputs": describe(graph.inputs), "outputs": describe(graph.outputs)}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _PeakRSS:
    """Peak resident memory of this process while the block runs, sampled every 10 ms
    (Linux ``/proc``; ``None`` elsewhere). Sampling leaves the process's own high-water
    mark untouched, so other measurements in the same process stay valid."""

    def __init__(self, interval: float = 0.01):
        self.interval = interval
        self.start: int | None = None
        self.peak: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak or 0, _rss_bytes())

    def __enter__(self) -> "_PeakRSS":
        try:
            self.start = self.peak = _rss_bytes()
        except (OSError, ValueError):
            return self
        self._thread = threading.Thread(target=self._sample, name="peak-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak or 0, _rss_bytes())


__all__ = ["build_decoder"]
