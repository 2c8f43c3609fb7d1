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
- ``vision_weights``: the one external-data file all vision graphs read their weights from
  (tensors stored once per distinct content), with counts and bytes before/after
- ``genai`` (``--target ort-genai``): onnxruntime-genai's model type, config files, wrapper graphs
- ``files``: every file of the bundle (relative path) with bytes and sha256
- ``processor``: the checkpoint's preprocessor settings; ``generation``: generation settings
- ``timings``: seconds per compile stage; ``peak_rss_bytes``
- ``manifest_sha256``: sha256 of this JSON (sorted keys, compact) without this field, so that
  an edited manifest is detected
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
from pathlib import Path

from . import __version__
from .bundle import STAGING_MARKER, sha256_file

SCHEMA = "qwen3vl-compile/manifest"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"

_LIBS = ("torch", "transformers", "onnx", "onnxruntime", "onnxscript", "onnx-ir", "numpy", "tokenizers")


def interface_name(name: str) -> str:
    """How a graph input/output is named in the manifest: the per-layer KV cache
    (``past_key_values.3.key``, ``present.3.value``) folded to one ``{i}`` entry."""
    for prefix in ("past_key_values.", "present."):
        if name.startswith(prefix):
            return prefix + "{i}." + name.rsplit(".", 1)[1]
    return name


def library_versions() -> dict[str, str | None]:
    out = {}
    for lib in _LIBS:
        try:
            out[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            out[lib] = None
    return out


def new_manifest(command: list[str]) -> dict:
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "tool": {"name": "qwen3vl-compile", "version": __version__},
        "libraries": library_versions(),
        "source": {},
        "options": {},
        "buckets": [],
        "graphs": {},
        "parity": {},
        "files": {},
        "processor": {},
        "generation": {},
        "timings": {},
    }


def hash_files(root: Path, manifest: dict) -> None:
    """Record bytes and sha256 of every file under ``root`` except the manifest itself."""
    files = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name not in (MANIFEST, STAGING_MARKER):
            rel = p.relative_to(root).as_posix()
            files[rel] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
    manifest["files"] = files


def write_manifest(root: Path, manifest: dict) -> Path:
    from .bundle_check import canonical_sha256

    manifest["manifest_sha256"] = canonical_sha256(manifest)
    path = root / MANIFEST
    path.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return path


def read_manifest(root: Path) -> dict:
    return json.loads((Path(root) / MANIFEST).read_text())
