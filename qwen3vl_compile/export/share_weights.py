"""One copy of the vision tower's weights for all vision graphs of a bundle.

Each bucket graph (and the any-size graph) is exported on its own, so each carries the whole
vision tower: for Qwen3-VL-4B 1.65 GB per graph, identical bytes but for the per-bucket
position table. :func:`share_weights` rewrites the graphs so that every initializer of at
least ``min_bytes`` lives in one shared external-data file, stored once per distinct content
(sha256): the graphs keep their structure and values, only where the bytes are read from
changes. Tensors are moved one at a time (peak memory: one tensor), offsets are aligned for
memory mapping, and the graphs' own data files are removed once nothing points at them.

ONNX external data may point anywhere in any file; ONNX Runtime reads each session's tensors
from the shared file.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import onnx
from onnx import TensorProto

ALIGNMENT = 4096
MIN_BYTES = 1024


def _external_info(t: TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


def _read(root: Path, t: TensorProto, cache: dict) -> bytes:
    if t.data_location != TensorProto.EXTERNAL:
        return t.raw_data
    info = _external_info(t)
    f = cache.get(info["location"])
    if f is None:
        f = cache[info["location"]] = open(root / info["location"], "rb")
    f.seek(int(info.get("offset", 0)))
    return f.read(int(info["length"]))


def _nbytes(t: TensorProto) -> int:
    if t.data_location == TensorProto.EXTERNAL:
        return int(_external_info(t)["length"])
    return len(t.raw_data)


def share_weights(root: Path, graph_files: list[str], data_name: str, *, min_bytes: int = MIN_BYTES) -> dict:
    """Move the initializers of ``graph_files`` (in ``root``) into ``root/data_name``, one copy
    per distinct content. Returns counts and sizes for the manifest."""
    root = Path(root)
    shared = root / data_name
    offsets: dict[str, tuple[int, int]] = {}  # sha256 -> (offset, length)
    old_files: set[str] = set()
    moved = reused = before = 0
    handles: dict[str, object] = {}
    try:
        with open(shared, "ab") as out:
            for name in graph_files:
                proto = onnx.load(str(root / name), load_external_data=False)
                for t in proto.graph.initializer:
                    size = _nbytes(t)
                    if size < min_bytes:
                        continue
                    if t.data_location == TensorProto.EXTERNAL:
                        location = _external_info(t)["location"]
                        if location == data_name:
                            continue
                        old_files.add(location)
                    blob = _read(root, t, handles)
                    before += size
                    digest = hashlib.sha256(blob).hexdigest()
                    if digest in offsets:
                        reused += 1
                    else:
                        pad = -out.tell() % ALIGNMENT
                        out.write(b"\0" * pad)
                        offsets[digest] = (out.tell(), len(blob))
                        out.write(blob)
                        moved += 1
                    offset, length = offsets[digest]
                    t.ClearField("raw_data")
                    del t.external_data[:]
                    t.data_location = TensorProto.EXTERNAL
                    for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(length))):
                        entry = t.external_data.add()
                        entry.key, entry.value = key, value
                # Rewritten in place: a small file now (the weights are references).
                tmp = root / f".{name}.tmp"
                onnx.save(proto, str(tmp))
                os.replace(tmp, root / name)
    finally:
        for f in handles.values():
            f.close()
    for location in old_files:
        (root / location).unlink(missing_ok=True)
    return {
        "file": data_name,
        "graphs": list(graph_files),
        "tensors_stored": moved,
        "tensors_shared": reused,
        "bytes_before": before,
        "bytes_after": shared.stat().st_size,
    }
