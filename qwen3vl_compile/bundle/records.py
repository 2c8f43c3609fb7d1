"""Typed records passed between compile stages, and their one JSON form in ``manifest.json``.

Each stage of the compile returns a :class:`StageResult` (the graphs it wrote, their parity,
bucket rows, failures, and any section of its own); the compiler assembles the manifest once
from those (:func:`qwen3vl_compile.bundle.manifest.assemble`). Readers of a bundle on disk
get the same records back with ``from_json``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..parity import GraphParity


@dataclasses.dataclass(frozen=True)
class PassReport:
    """What one graph pass did: whether it changed the graph, counts, seconds."""

    name: str
    modified: bool
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {"pass": self.name, "modified": self.modified, "stats": self.stats, "seconds": self.seconds}

    @classmethod
    def from_json(cls, d: dict) -> "PassReport":
        return cls(d["pass"], bool(d["modified"]), dict(d.get("stats") or {}), float(d.get("seconds") or 0.0))


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One graph input or output as the manifest describes it (``shape``: ints for static
    dims, strings for symbolic ones; None when unknown)."""

    name: str
    dtype: str
    shape: tuple | None = None

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape) if self.shape is not None else None}

    @classmethod
    def from_json(cls, d: dict) -> "TensorInfo":
        shape = d.get("shape")
        return cls(d["name"], d["dtype"], tuple(shape) if shape is not None else None)


# Keys every graph entry has; whatever else a graph kind records lives in ``details``.
_GRAPH_KEYS = ("file", "data_files", "kind", "precision", "inputs", "outputs", "passes")


@dataclasses.dataclass
class GraphEntry:
    """One graph file of the bundle: its files, kind, precision, interface and pass reports,
    plus kind-specific facts (``details``: the bucket, the exporter, patches applied, the
    decoder's quantization and spec, a wrapper's source graph, ...)."""

    file: str
    kind: str
    precision: str
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    data_files: list[str] = dataclasses.field(default_factory=list)
    passes: list[PassReport] = dataclasses.field(default_factory=list)
    details: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.file.removesuffix(".onnx")

    def to_json(self) -> dict:
        return {
            "file": self.file,
            "data_files": list(self.data_files),
            "kind": self.kind,
            "precision": self.precision,
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
            **self.details,
            "passes": [p.to_json() for p in self.passes],
        }

    @classmethod
    def from_json(cls, d: dict) -> "GraphEntry":
        return cls(
            file=d["file"],
            kind=d["kind"],
            precision=d["precision"],
            inputs=[TensorInfo.from_json(t) for t in d.get("inputs") or []],
            outputs=[TensorInfo.from_json(t) for t in d.get("outputs") or []],
            data_files=list(d.get("data_files") or []),
            passes=[PassReport.from_json(p) for p in d.get("passes") or []],
            details={k: v for k, v in d.items() if k not in _GRAPH_KEYS},
        )


@dataclasses.dataclass
class GoldenRef:
    """Where a graph's golden input/output pair lies in the bundle, and the tolerance
    ``qwen3vl-compile verify`` applies to it."""

    file: str
    tolerance_max_rel: float

    def to_json(self) -> dict:
        return {"file": self.file, "tolerance_max_rel": self.tolerance_max_rel}


@dataclasses.dataclass
class ParityRecord:
    """A graph's measured parity and its golden, if one was recorded."""

    parity: GraphParity
    golden: GoldenRef | None = None

    def to_json(self) -> dict:
        out = self.parity.to_json()
        if self.golden is not None:
            out["golden"] = self.golden.to_json()
        return out


@dataclasses.dataclass
class StageResult:
    """What one compile stage produced."""

    graphs: dict[str, GraphEntry] = dataclasses.field(default_factory=dict)
    parity: dict[str, ParityRecord] = dataclasses.field(default_factory=dict)
    buckets: list[dict] = dataclasses.field(default_factory=list)
    failures: list[str] = dataclasses.field(default_factory=list)
    # Top-level manifest sections owned by this stage (e.g. "vision_weights", "genai").
    sections: dict[str, Any] = dataclasses.field(default_factory=dict)

    def add(self, other: "StageResult") -> "StageResult":
        self.graphs.update(other.graphs)
        self.parity.update(other.parity)
        self.buckets += other.buckets
        self.failures += other.failures
        self.sections.update(other.sections)
        return self
