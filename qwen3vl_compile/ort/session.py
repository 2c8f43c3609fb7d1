"""The one place ONNX Runtime sessions are made: ``threads`` and the execution providers honoured."""

from __future__ import annotations

from pathlib import Path


def ort_session(path: Path | str, threads: int = 0, providers=("CPUExecutionProvider",)):
    """An ``onnxruntime.InferenceSession`` on ``providers`` (default the CPU). ``threads`` > 0
    sets the intra-op pool to that many threads and runs graph nodes one at a time (inter-op
    1), so that ``--threads N`` means N busy cores; 0 keeps ONNX Runtime's defaults."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=list(providers))
