"""The old import path of :func:`qwen3vl_compile.ort.session.ort_session` (the one place
ONNX Runtime sessions are made), kept for callers that import it from the runtime."""

from ..ort.session import ort_session  # noqa: F401
