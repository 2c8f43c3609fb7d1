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
        return cls(d["pass"], bool(d.get("modified")), dict(d.get("stats") or {}), float(d.get("seconds") or 0.0))


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
        return cls(d["name"], d.get("dtype", ""), tuple(shape) if shape is not None else None)


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

    @property
    def spec(self) -> "DecoderSpec":
        """A decoder graph's spec (KeyError for a graph that has none)."""
        return DecoderSpec.from_json(self.details["spec"])

    @property
    def source_graph(self) -> str | None:
        """The graph whose weights an onnxruntime-genai wrapper reads, if this is one."""
        return self.details.get("source_graph")

    @property
    def dynamic(self) -> bool:
        """A vision graph that takes any image size (the grid is an input)."""
        return bool(self.details.get("dynamic"))

    @property
    def images_per_call(self) -> int | None:
        return self.details.get("images_per_call")

    @property
    def deepstack_packing(self) -> dict | None:
        """How a wrapper packs (features, DeepStack) pairs into one wide tensor, if it does."""
        return self.details.get("deepstack_packing")

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


# -- the read side: a bundle's manifest as typed records --------------------------------------
# ``bundle.manifest.validate_manifest`` checks the JSON's shape once, when the manifest is
# loaded; these records only give its sections names and types (they check nothing again).


@dataclasses.dataclass(frozen=True)
class DecoderSpec:
    """A decoder graph's ``spec``: the rotary table's length (the longest sequence it serves),
    the hidden size of its input embeddings, and how many DeepStack levels it takes."""

    context_length: int
    hidden: int
    deepstack_levels: int

    @classmethod
    def from_json(cls, d: dict) -> "DecoderSpec":
        return cls(int(d["context_length"]), int(d["hidden"]), int(d["deepstack_levels"]))


@dataclasses.dataclass(frozen=True)
class BucketRow:
    """One vision bucket: the image size it serves, its processed grid and token count, and
    the graph file that runs it."""

    name: str
    height: int
    width: int
    grid_thw: tuple[int, int, int]
    num_tokens: int
    graph: str

    @classmethod
    def from_json(cls, d: dict) -> "BucketRow":
        return cls(d["name"], d["height"], d["width"], tuple(d["grid_thw"]), d.get("num_tokens", 0), d["graph"])


@dataclasses.dataclass
class BundleManifest:
    """What a reader of a bundle (the runtime, ``inspect``) takes from its manifest: the
    graphs, the vision buckets, the image processor's settings and the fallback weights.
    ``json`` keeps the whole manifest as read."""

    graphs: dict[str, GraphEntry]
    buckets: list[BucketRow]
    processor: dict[str, Any]
    fallback: dict[str, Any] | None
    json: dict[str, Any]

    @classmethod
    def from_json(cls, m: dict) -> "BundleManifest":
        return cls(
            graphs={name: GraphEntry.from_json(g) for name, g in (m.get("graphs") or {}).items()},
            buckets=[BucketRow.from_json(b) for b in m.get("buckets") or []],
            processor=dict(m.get("processor") or {}),
            fallback=m.get("fallback") or None,
            json=m,
        )

    @classmethod
    def of(cls, manifest: "BundleManifest | dict") -> "BundleManifest":
        """``manifest`` typed: a BundleManifest as it is, a manifest's JSON object read."""
        return manifest if isinstance(manifest, cls) else cls.from_json(manifest)
