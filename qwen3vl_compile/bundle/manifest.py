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
- ``manifest_sha256``: sha256 of this JSON (sorted keys, compact) without this field, so that
  an edited manifest is detected
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from pathlib import Path

from .. import __version__
from ..errors import BundleError
from ..upstream import installed_version
from .records import StageResult

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


def read_json_object(path: Path, error: type[Exception] = BundleError, what: str = "") -> dict:
    """A JSON file that must hold an object (a config, a manifest): its dict, or ``error``
    in one line for an unreadable file, bad JSON or another JSON type."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path}: unreadable ({e})") from None
    if not isinstance(value, dict):
        raise error(f"{path}: not a JSON object{what}")
    return value


def load_manifest(root: Path) -> dict:
    path = Path(root) / MANIFEST
    if not Path(root).is_dir():
        raise BundleError(f"{root}: not a directory")
    if not path.is_file():
        raise BundleError(f"{path}: missing (not a qwen3vl-compile bundle?)")
    manifest = read_json_object(path, BundleError, " (not a qwen3vl-compile manifest)")
    if manifest.get("schema") != SCHEMA:
        raise BundleError(f"{path}: schema {manifest.get('schema')!r} is not {SCHEMA!r}")
    version = manifest.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= SCHEMA_VERSION:
        raise BundleError(f"{path}: schema_version {version!r}: this qwen3vl-compile reads versions 1 to {SCHEMA_VERSION} "
                          "(a bundle from a newer version needs a newer qwen3vl-compile)")
    return manifest
