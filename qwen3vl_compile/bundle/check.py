"""Checking a bundle on disk against its manifest (torch-free).

- the manifest must parse, carry our schema, and match its own ``manifest_sha256`` (a hash
  of the manifest's canonical JSON without that field), so an edited manifest is caught;
- every file the manifest lists must exist with the recorded size and sha256 (a missing
  file, a truncated external-data file, or a graph copied from another bundle all fail);
- every graph's files must be listed;
- :func:`unknown_files`: what lies in the bundle unlisted (``verify`` fails on it).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import BundleError
from .manifest import MANIFEST, SIGNATURE, canonical_sha256, load_manifest, sha256_file


def check_manifest_integrity(root: Path, manifest: dict) -> None:
    recorded = manifest.get("manifest_sha256")
    if not recorded:
        raise BundleError(f"{Path(root) / MANIFEST}: has no manifest_sha256")
    if canonical_sha256(manifest) != recorded:
        raise BundleError(f"{Path(root) / MANIFEST}: edited after the compile (its content no longer matches manifest_sha256)")


def check_files(root: Path, manifest: dict, *, hashes: bool = True) -> list[str]:
    """Return one message per problem (empty: all good)."""
    root = Path(root)
    problems = []
    files = manifest.get("files", {})
    for graph in manifest.get("graphs", {}).values():
        for f in [graph["file"], *graph.get("data_files", [])]:
            if f not in files:
                problems.append(f"{f}: used by a graph but not listed in the manifest")
    for rel, info in files.items():
        p = root / rel
        if not p.is_file():
            problems.append(f"{rel}: missing")
            continue
        if not hashes:  # --skip-hash-check: presence only
            continue
        size = p.stat().st_size
        if size != info["bytes"]:
            problems.append(f"{rel}: {size} bytes, manifest says {info['bytes']} (truncated or replaced)")
            continue
        if sha256_file(p) != info["sha256"]:
            problems.append(f"{rel}: sha256 differs from the manifest (modified, or from another bundle)")
    return problems


def unknown_files(root: Path, manifest: dict) -> list[str]:
    """Every file (or link) under ``root`` that the manifest does not list, besides the
    manifest itself. The runtime never reads one (it opens only listed names); ``verify``
    fails on them, since another loader (onnxruntime-genai, transformers) might."""
    root = Path(root)
    known = set(manifest.get("files") or {}) | {MANIFEST, SIGNATURE}
    return [rel for p in sorted(root.rglob("*"))
            if (p.is_file() or p.is_symlink()) and (rel := p.relative_to(root).as_posix()) not in known]


def open_checked(root: Path, *, skip_hash_check: bool = False) -> dict:
    """Load the manifest and check the bundle; raise BundleError naming every bad file."""
    manifest = load_manifest(root)
    check_manifest_integrity(root, manifest)
    problems = check_files(root, manifest, hashes=not skip_hash_check)
    if problems:
        # Only a changed file's content can be skipped over; a missing one cannot.
        hint = not skip_hash_check and all(": missing" not in p and "not listed" not in p for p in problems)
        raise BundleError(f"{root}: bundle check failed: " + "; ".join(problems) + (
            " (use --skip-hash-check to run anyway)" if hint else ""))
    return manifest
