"""The one frozen configuration object the CLI builds and passes down.

Text-side build options (precision, block size, ...) live in one
:class:`~qwen3vl_compile.options.DecoderOptions`, validated there; this object adds what
the whole compile needs and validates the combinations.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .buckets import VisionBucket
from .errors import UsageError
from .options import PRECISIONS, VISION_PRECISIONS, DecoderOptions, check_threads  # noqa: F401 - PRECISIONS re-exported for the CLI

GRAPH_KINDS = ("vision", "embedding", "decoder")
# onnx: the bundle for qwen3vl-run / Pipeline; ort-genai: also loadable by onnxruntime-genai.
TARGETS = ("onnx", "ort-genai")


@dataclasses.dataclass(frozen=True)
class CompileConfig:
    model: str
    output: Path
    buckets: tuple[VisionBucket, ...]
    decoder: DecoderOptions = DecoderOptions()
    graphs: tuple[str, ...] = GRAPH_KINDS
    target: str = "onnx"
    vision_precision: str = "fp32"
    verify: bool = True
    force: bool = False
    threads: int = 0
    cache_dir: Path | None = None
    verbose: bool | None = None
    command: tuple[str, ...] = ()
    sign_key: Path | None = None  # PEM private key: the bundle gets model.sig (bundle/signing.py)

    def __post_init__(self):
        unknown = [g for g in self.graphs if g not in GRAPH_KINDS]
        if unknown or not self.graphs:
            raise UsageError(f"--graphs: unknown graph kind(s) {unknown}; choose from {', '.join(GRAPH_KINDS)}")
        check_threads(self.threads)
        if self.decoder.embedding_precision == "int4" and not {"embedding", "decoder"} <= set(self.graphs):
            raise UsageError("--embedding-precision int4 shares the decoder's INT4 lm_head: it needs both the "
                             "embedding and decoder graphs")
        if "vision" in self.graphs and not self.buckets:
            raise UsageError("--buckets: at least one bucket is needed to build vision graphs")
        if self.vision_precision not in VISION_PRECISIONS:
            raise UsageError(f"--vision-precision {self.vision_precision!r}: choose one of {', '.join(VISION_PRECISIONS)}")
        if self.target not in TARGETS:
            raise UsageError(f"--target {self.target!r}: choose one of {', '.join(TARGETS)}")
        if self.target == "ort-genai":
            from .buckets import split_buckets

            if set(self.graphs) != set(GRAPH_KINDS):
                raise UsageError("--target ort-genai needs every graph (vision, embedding, decoder): drop --graphs")
            if split_buckets(self.buckets)[1] is None:
                raise UsageError("--target ort-genai needs the any-size vision graph: add 'dynamic' to --buckets")

    def options_json(self) -> dict:
        return {
            **self.decoder.to_json(),
            "graphs": list(self.graphs),
            "target": self.target,
            "vision_precision": self.vision_precision,
            "buckets": [b.name for b in self.buckets],
            "verify": self.verify,
            "threads": self.threads,
        }
