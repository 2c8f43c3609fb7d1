"""The one frozen configuration object the CLI builds and passes down."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .buckets import VisionBucket
from .errors import UsageError

PRECISIONS = ("fp32", "fp16", "int4")
GRAPH_KINDS = ("vision", "embedding", "decoder")
# onnx: the bundle for qwen3vl-run / Pipeline; ort-genai: also loadable by onnxruntime-genai.
TARGETS = ("onnx", "ort-genai")


@dataclasses.dataclass(frozen=True)
class CompileConfig:
    model: str
    output: Path
    buckets: tuple[VisionBucket, ...]
    precision: str = "int4"
    block_size: int = 32
    accuracy_level: int = 4
    keep_lm_head_fp: bool = False
    context_length: int = 8192
    logits: str = "last"
    embedding_precision: str = "auto"
    graphs: tuple[str, ...] = GRAPH_KINDS
    target: str = "onnx"
    verify: bool = True
    force: bool = False
    threads: int = 0
    cache_dir: Path | None = None
    verbose: bool | None = None
    command: tuple[str, ...] = ()

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise UsageError(f"--precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}")
        unknown = [g for g in self.graphs if g not in GRAPH_KINDS]
        if unknown or not self.graphs:
            raise UsageError(f"--graphs: unknown graph kind(s) {unknown}; choose from {', '.join(GRAPH_KINDS)}")
        if self.block_size not in (16, 32, 64, 128, 256):
            raise UsageError(f"--block-size {self.block_size}: choose 16, 32, 64, 128 or 256")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise UsageError(f"--accuracy-level {self.accuracy_level}: choose 0..4")
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 0:
            raise UsageError(f"--threads {self.threads}: must be 0 (the library default) or more")
        if self.context_length < 64:
            raise UsageError(f"--context-length {self.context_length}: must be at least 64")
        if self.embedding_precision not in ("auto", "fp32", "int4"):
            raise UsageError(f"--embedding-precision {self.embedding_precision!r}: choose auto, fp32 or int4")
        if self.embedding_precision == "int4" and (
            self.precision != "int4" or self.keep_lm_head_fp or not {"embedding", "decoder"} <= set(self.graphs)
        ):
            raise UsageError(
                "--embedding-precision int4 shares the decoder's INT4 lm_head: it needs --precision int4, "
                "no --keep-lm-head-fp, and both the embedding and decoder graphs"
            )
        if self.logits not in ("last", "all"):
            raise UsageError(f"--logits {self.logits!r}: choose last or all")
        if "vision" in self.graphs and not self.buckets:
            raise UsageError("--buckets: at least one bucket is needed to build vision graphs")
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
            "precision": self.precision,
            "block_size": self.block_size,
            "accuracy_level": self.accuracy_level,
            "keep_lm_head_fp": self.keep_lm_head_fp,
            "context_length": self.context_length,
            "logits": self.logits,
            "embedding_precision": self.embedding_precision,
            "graphs": list(self.graphs),
            "target": self.target,
            "buckets": [b.name for b in self.buckets],
            "verify": self.verify,
            "threads": self.threads,
        }
