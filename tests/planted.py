"""Bugs planted on purpose, to prove that a check sees them."""

from __future__ import annotations

import numpy as np


def swap_mrope_streams(model):
    """Every MRotaryEmbedding of an onnx-ir decoder reads ``position_ids`` with the H and W
    streams swapped (a wrong interleave)."""
    import onnx_ir as ir

    g = model.graph
    pos = next(v for v in g.inputs if v.name == "position_ids")
    idx = ir.Value(name="planted_swap_idx", const_value=ir.tensor(np.array([0, 2, 1], np.int64)))
    g.register_initializer(idx)
    gather = ir.node("Gather", [pos, idx], attributes={"axis": 0}, name="planted_swap")
    g.insert_before(g[0], gather)
    for node in list(g):
        if node.op_type == "MRotaryEmbedding":
            node.replace_input_with(1, gather.outputs[0])
    return model


def rehash_bundle(root, manifest: dict | None = None, *, drop_missing: bool = True) -> dict:
    """What someone altering a bundle would do to pass the hash checks: recompute the bytes
    and sha256 of every file the manifest lists (``manifest``: an edited manifest to write
    instead of the one on disk), then its ``manifest_sha256``. Files the manifest does not
    list stay unlisted; listed files that are gone are dropped (``drop_missing``)."""
    import json
    from pathlib import Path

    from qwen3vl_compile.bundle.manifest import MANIFEST, sha256_file, write_manifest

    root = Path(root)
    m = manifest if manifest is not None else json.loads((root / MANIFEST).read_text())
    files = m.get("files")
    if isinstance(files, dict):
        for rel in list(files):
            p = root / rel
            if p.is_file():
                files[rel] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
            elif drop_missing:
                del files[rel]
    write_manifest(root, m)
    return m
