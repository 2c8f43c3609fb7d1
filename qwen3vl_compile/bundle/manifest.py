"""The bundle manifest (``manifest.json``): a versioned, self-describing record of what a
bundle holds and how it was verified.

Schema ``qwen3vl-compile/manifest`` version 1, top-level keys:

- ``schema``, ``schema_version``, ``created`` (UTC ISO time), ``command`` (argv)
- ``tool``: name and version; ``libraries``: versions of torch, transformers, onnx, ...
- ``source``: the model spec given, resolved path, architecture, sha256 of config.json
- ``options``: the compile options (precision, buckets, block size, ...)
- ``buckets``: one entry per vision bucket (name, height, width, grid_thw, tokens, graph)
- ``graphs``: per graph: file, data files, kind, precision, inputs/outputs, export info,
  patches applied, and every pass's report (name, modified, stats, seconds)
- ``parity``: per graph: reference, tolerance, per case and per output max abs/rel error
- ``fallback``: the vision tower's weights for the PyTorch fallback (file, tensors, dtypes)
- ``vision_weights``: the one external-data file all vision graphs read their weights from
  (tensors stored once per distinct content), with counts and bytes before/after
- ``genai`` (``--target ort-genai``): onnxruntime-genai's model type, config files, wrapper graphs
- ``files``: every file of the bundle (relative path) with bytes and sha256
- ``processor``: the checkpoint's preprocessor settings; ``generation``: generation settings
- ``timings``: seconds per compile stage; ``peak_rss_bytes``
- ``text_golden``: the text side's golden (``golden/text.json``): prompts rendered through the
  bundle's chat template and tokenizer, stop tokens, the processed grid and pixels of fixed
  image sizes, as the runtime computed them at compile time
- ``manifest_sha256``: sha256 of this JSON (sorted keys, compact) without this field, so that
  an edited manifest is detected

:func:`load_manifest` checks the shape of everything a reader indexes (:func:`validate_manifest`),
so that a malformed manifest, even one whose ``manifest_sha256`` was recomputed, is one
``[bundle]`` line. The runtime reads a bundle's files only through :class:`BundleFiles`: a name
the manifest does not list is never opened.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import re
from pathlib import Path, PurePosixPath

from .. import __version__
from ..errors import BundleError
from ..jsonio import read_json_object  # noqa: F401 - also read from here by older callers
from ..upstream import installed_version
from .records import StageResult

SCHEMA = "qwen3vl-compile/manifest"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
# The optional signature (bundle/signing.py): made after the manifest, so it cannot list it.
SIGNATURE = "model.sig"

_LIBS = ("torch", "transformers", "onnx", "onnxruntime", "onnxscript", "onnx-ir", "numpy", "tokenizers")


def interface_name(name: str) -> str:
    """How a graph input/output is named in the manifest: the per-layer KV cache
    (``past_key_values.3.key``, ``present.3.value``) folded to one ``{i}`` entry."""
    for prefix in ("past_key_values.", "present."):
        if name.startswith(prefix):
            return prefix + "{i}." + name.rsplit(".", 1)[1]
    return name


def library_versions() -> dict[str, str | None]:
    return {lib: installed_version(lib) for lib in _LIBS}


def assemble(*, command: list[str], source: dict, options: dict, processor: dict, generation: dict,
             result: StageResult, timings: dict, peak_rss_bytes: int | None) -> dict:
    """The manifest, assembled once from the compile's typed records (``files`` and
    ``manifest_sha256`` are added by :func:`hash_files` and :func:`write_manifest`)."""
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": list(command),
        "tool": {"name": "qwen3vl-compile", "version": __version__},
        "libraries": library_versions(),
        "source": source,
        "options": options,
        "buckets": list(result.buckets),
        "graphs": {name: g.to_json() for name, g in result.graphs.items()},
        "parity": {name: r.to_json() for name, r in result.parity.items()},
        "files": {},
        "processor": processor,
        "generation": generation,
        **result.sections,
        "timings": dict(timings),
        "peak_rss_bytes": peak_rss_bytes,
    }


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def canonical_sha256(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON (sorted keys, compact) without ``manifest_sha256``."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def hash_files(root: Path, manifest: dict, *, exclude: tuple[str, ...] = ()) -> None:
    """Record bytes and sha256 of every file under ``root`` except the manifest itself and
    the file names in ``exclude``."""
    files = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name not in (MANIFEST, *exclude):
            rel = p.relative_to(root).as_posix()
            files[rel] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
    manifest["files"] = files


def write_manifest(root: Path, manifest: dict) -> Path:
    manifest["manifest_sha256"] = canonical_sha256(manifest)
    path = root / MANIFEST
    path.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return path


def load_manifest(root: Path) -> dict:
    path = Path(root) / MANIFEST
    if not Path(root).is_dir():
        raise BundleError(f"{root}: not a directory")
    if not path.is_file():
        raise BundleError(f"{path}: missing (not a qwen3vl-compile bundle?)")
    manifest = read_json_object(path, BundleError, " (not a qwen3vl-compile manifest)")
    validate_manifest(manifest, path)
    if manifest.get("schema") != SCHEMA:
        raise BundleError(f"{path}: schema {manifest.get('schema')!r} is not {SCHEMA!r}")
    version = manifest.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= SCHEMA_VERSION:
        raise BundleError(f"{path}: schema_version {version!r}: this qwen3vl-compile reads versions 1 to {SCHEMA_VERSION} "
                          "(a bundle from a newer version needs a newer qwen3vl-compile)")
    return manifest


GRAPH_KINDS = ("vision", "embedding", "decoder")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _int(value, minimum: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def safe_relative(rel) -> bool:
    """A bundle-relative file name: a non-empty POSIX path inside the bundle (no absolute
    path, no ``..``, no backslash, not the manifest itself)."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\x00" in rel or rel == MANIFEST:
        return False
    parts = PurePosixPath(rel).parts
    return not PurePosixPath(rel).is_absolute() and ".." not in parts and "." not in rel.split("/")


def validate_manifest(m: dict, where: Path | str = MANIFEST) -> None:
    """The manifest's shape: every key a reader of the bundle (inspect, verify, the runtime)
    indexes, with its type, and every file a section names listed in ``files``. Raises
    BundleError, one line naming the first problem."""

    def bad(what: str):
        raise BundleError(f"{where}: malformed manifest: {what}")

    for key in ("tool", "source", "options", "libraries", "timings", "processor", "generation"):
        if key in m and not isinstance(m[key], dict):
            bad(f"{key!r} must be an object, got {type(m[key]).__name__}")
    tool = m.get("tool")
    if not isinstance(tool, dict) or not all(isinstance(tool.get(k), str) for k in ("name", "version")):
        bad("'tool' must name the tool and its version")
    files = m.get("files")
    if not isinstance(files, dict) or not files:
        bad("'files' must be a non-empty object of file -> {bytes, sha256}")
    for rel, info in files.items():
        if not safe_relative(rel):
            bad(f"file name {rel!r} is not a path inside the bundle")
        if not (isinstance(info, dict) and _int(info.get("bytes")) and isinstance(info.get("sha256"), str)
                and _SHA256.fullmatch(info["sha256"])):
            bad(f"files[{rel!r}] must be {{bytes: int, sha256: 64 hex digits}}, got {info!r}"[:300])

    def listed(rel, what: str) -> None:
        if not isinstance(rel, str) or rel not in files:
            bad(f"{what} {rel!r} is not a file the manifest lists")

    graphs = m.get("graphs")
    if not isinstance(graphs, dict) or not graphs:
        bad("'graphs' must be a non-empty object of graph name -> entry")
    for name, g in graphs.items():
        if not isinstance(g, dict):
            bad(f"graph {name!r} must be an object")
        if "file" not in g:
            bad(f"graph {name!r} has no 'file'")
        listed(g["file"], f"graph {name!r}'s file")
        if not str(g["file"]).endswith(".onnx"):
            bad(f"graph {name!r}'s file {g['file']!r} is not an .onnx file")
        if g.get("kind") not in GRAPH_KINDS:
            bad(f"graph {name!r} has kind {g.get('kind')!r}, not one of {', '.join(GRAPH_KINDS)}")
        if not isinstance(g.get("precision"), str):
            bad(f"graph {name!r} has no precision")
        data_files = g.get("data_files", [])
        if not isinstance(data_files, list):
            bad(f"graph {name!r}'s data_files must be a list")
        for f in data_files:
            listed(f, f"graph {name!r}'s data file")
        for side in ("inputs", "outputs"):
            values = g.get(side)
            if values is not None and not (isinstance(values, list) and all(
                    isinstance(v, dict) and isinstance(v.get("name"), str)
                    and (v.get("shape") is None or isinstance(v.get("shape"), list)) for v in values)):
                bad(f"graph {name!r}'s {side} must be a list of {{name, dtype, shape}}")
        passes = g.get("passes", [])
        if not (isinstance(passes, list) and all(isinstance(p, dict) and isinstance(p.get("pass"), str) for p in passes)):
            bad(f"graph {name!r}'s passes must be a list of {{pass, modified, ...}}")
        if g["kind"] == "decoder":
            spec = g.get("spec")
            if not isinstance(spec, dict) or not all(_int(spec.get(k), 1 if k != "deepstack_levels" else 0)
                                                     for k in ("context_length", "hidden", "deepstack_levels")):
                bad(f"decoder graph {name!r} needs a spec with context_length, hidden and deepstack_levels")
        source = g.get("source_graph")
        if source is not None and source not in graphs:
            bad(f"graph {name!r}'s source_graph {source!r} is not a graph of the manifest")
    graph_files = {g["file"]: g for g in graphs.values()}
    buckets = m.get("buckets", [])
    if not isinstance(buckets, list):
        bad("'buckets' must be a list")
    for b in buckets:
        if not isinstance(b, dict):
            bad(f"buckets: entry {b!r} is not an object")
        label = b.get("name")
        grid = b.get("grid_thw")
        if not (isinstance(label, str) and _int(b.get("height"), 1) and _int(b.get("width"), 1)
                and isinstance(grid, list) and len(grid) == 3 and all(_int(v, 1) for v in grid)
                and _int(b.get("num_tokens"), 1) and isinstance(b.get("graph"), str)):
            bad(f"buckets: {label!r} needs name, height, width, grid_thw [t, h, w], num_tokens and graph")
        if graph_files.get(b["graph"], {}).get("kind") != "vision":
            bad(f"buckets: {label!r} names graph {b['graph']!r}, not a vision graph of the manifest")
    parity = m.get("parity", {})
    if not isinstance(parity, dict):
        bad("'parity' must be an object of graph name -> record")
    for name, entry in parity.items():
        if name not in graphs:
            bad(f"parity record {name!r} is for no graph of the manifest")
        cases = entry.get("cases") if isinstance(entry, dict) else None
        if not (isinstance(cases, dict) and all(
                isinstance(outs, dict) and all(isinstance(o, dict) and _number(o.get("max_rel")) for o in outs.values())
                for outs in cases.values()) and isinstance(entry.get("passed"), bool)):
            bad(f"parity record {name!r} needs passed and cases {{case: {{output: {{max_rel, ...}}}}}}")
        if "golden" in entry:
            golden = entry["golden"]
            if not isinstance(golden, dict):
                bad(f"parity record {name!r}: golden must be an object")
            listed(golden.get("file"), f"graph {name!r}'s golden")
    for section in ("fallback", "text_golden"):
        if section in m:
            if not isinstance(m[section], dict):
                bad(f"{section!r} must be an object")
            listed(m[section].get("file"), f"{section}'s file")
    if "processor" in m:
        from ..errors import LoadError
        from ..processor_config import ProcessorConfig

        try:
            ProcessorConfig.from_dict(m["processor"])
        except (TypeError, ValueError, AttributeError, LoadError) as e:
            bad(f"'processor' settings cannot be read ({str(e).removeprefix('[load] ')})"[:300])


class BundleFiles:
    """The files of a bundle the runtime may read: only the names its manifest lists (and so
    hashes); ``directory`` is the same for a checkpoint directory (every file in it). Each
    read of a bundle file goes through :meth:`find` (optional files) or :meth:`path`."""

    def __init__(self, root: Path, listed=None):
        self.root = Path(root)
        self.listed = None if listed is None else frozenset(listed)

    @classmethod
    def of_manifest(cls, root: Path, manifest: dict) -> "BundleFiles":
        return cls(root, manifest.get("files") or {})

    @classmethod
    def directory(cls, root: Path) -> "BundleFiles":
        return cls(root, None)

    def find(self, rel: str) -> Path | None:
        """``root / rel`` when the manifest lists ``rel`` and it is a file, else None."""
        if self.listed is not None and rel not in self.listed:
            return None
        path = self.root / rel
        return path if path.is_file() else None

    def path(self, rel: str) -> Path:
        found = self.find(rel)
        if found is None:
            if self.listed is not None and rel not in self.listed:
                raise BundleError(f"{self.root}: {rel!r} is not a file the bundle's manifest lists")
            raise BundleError(f"{self.root / rel}: missing")
        return found
