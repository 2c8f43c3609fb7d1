"""Re-measuring a bundle's parity with ONNX Runtime alone (no torch, no transformers).

At compile time each graph keeps one input and its PyTorch reference output in
``golden/<graph>.npz``; :func:`check_golden` runs the graph on that input and compares with
the tolerance recorded in the manifest: the precision's gate where there is one (fp32:
1e-4), or the tolerance the compile recorded with the golden; for graphs without a gate
(bundles from older versions) "no worse than measured at
compile time", with a margin for other CPUs' int8 kernels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .manifest import interface_name
from ..parity import TOLERANCES, GraphParity, measure
from ..runtime.session import ort_session


def pixel_values_from_u8(u8: np.ndarray) -> np.ndarray:
    """A vision golden's input is stored compactly as uint8 patch values and decoded to the
    graph's float input by this one fixed map, at compile time and at verify time alike (it
    is the golden file's encoding, not a statement about the checkpoint's processor)."""
    return ((u8.astype(np.float32) / np.float32(255.0)) - np.float32(0.5)) / np.float32(0.5)


def golden_tolerance(kind: str, precision: str, compile_rel: float) -> float:
    gate = TOLERANCES.get((kind, precision), float("inf"))
    if np.isfinite(gate):
        return gate
    return float(f"{max(compile_rel * 1.25, compile_rel + 1e-3):.3e}")


def check_interface(session, manifest: dict, name: str) -> list[str]:
    """The graph's real inputs and outputs (names, dtypes, static dims) against the
    manifest's claims, and a bucket graph's shapes against its bucket's grid: one message
    per mismatch."""
    graph = manifest["graphs"][name]
    problems = []
    for side, values in (("inputs", session.get_inputs()), ("outputs", session.get_outputs())):
        if graph.get(side) is None:
            continue
        real = {}
        for v in values:
            real.setdefault(interface_name(v.name), v)
        claimed = {c["name"]: c for c in graph[side]}
        if set(real) != set(claimed):
            problems.append(f"{name}: {side} are {sorted(real)}, the manifest says {sorted(claimed)}")
            continue
        for key, c in claimed.items():
            shape = real[key].shape
            for i, d in enumerate(c.get("shape") or []):
                if isinstance(d, int) and (i >= len(shape) or shape[i] != d):
                    problems.append(f"{name}: {side[:-1]} {key} has shape {shape}, the manifest says {c['shape']}")
                    break
    for b in manifest.get("buckets", []):
        if b.get("graph") == graph["file"]:
            t, h, w = b["grid_thw"]
            rows = {v.name: v.shape for v in (*session.get_inputs(), *session.get_outputs())}
            want = {"pixel_values": t * h * w, "image_features": b["num_tokens"]}
            for key, n in want.items():
                if key in rows and rows[key] and rows[key][0] != n:
                    problems.append(f"{name}: {key} has {rows[key][0]} rows but bucket {b['name']} (grid {h}x{w}) needs {n}")
    return problems


def check_golden(root: Path, manifest: dict, name: str, *, threads: int = 0, session=None) -> GraphParity:
    """Graph ``name`` of a bundle's manifest on its recorded golden. ``session``: an already
    created ONNX Runtime session of the graph (else one is made)."""
    parity = manifest["parity"][name]
    return check_graph_golden(root, manifest["graphs"][name], parity["golden"], reference=parity["reference"],
                              threads=threads, session=session)


def check_graph_golden(root: Path, graph: dict, golden: dict, *, reference: str = "", threads: int = 0,
                       session=None) -> GraphParity:
    """One graph (its manifest entry, ``graph``) run on a golden (``golden``: the npz file
    under ``root`` and the tolerance) and measured against the recorded reference output."""
    root = Path(root)
    name = graph["file"].removesuffix(".onnx")
    data = dict(np.load(root / golden["file"]))
    tol = float(golden["tolerance_max_rel"])
    path = root / graph["file"]
    kind = graph["kind"]
    packing = graph.get("deepstack_packing")
    session = session or ort_session(path, threads)
    if kind == "vision":
        inputs = {"pixel_values": pixel_values_from_u8(data["pixel_u8"])}
        if graph.get("dynamic"):  # the any-size graph also takes the grid(s) it was checked on
            inputs["image_grid_thw"] = data["image_grid_thw"].astype(np.int64)
        feats, deep = _run(session, ["image_features", "deepstack_features"], inputs, packing)
        outs = [measure("image_features", feats, data["image_features"], tol),
                measure("deepstack_features", deep, data["deepstack_features"], tol)]
    elif kind == "embedding":
        embeds, deep = _run(
            session,
            ["inputs_embeds", "deepstack_embeds"],
            {k: data[k] for k in ("input_ids", "image_features", "deepstack_features")},
            packing,
        )
        outs = [measure("inputs_embeds", embeds, data["inputs_embeds"], tol),
                measure("deepstack_embeds", deep, data["deepstack_embeds"], tol)]
    elif kind == "decoder":
        from ..runtime.decoder_session import DecoderSession

        s = DecoderSession(path, max_length=256, session=session,
                           packed_levels=packing["levels"] if packing else 0)
        logits = [s.run(data["prefill_embeds"], data["prefill_positions"], data["prefill_deepstack"])[0, -1]]
        for e, p in zip(data["step_embeds"], data["step_positions"]):
            logits.append(s.run(e, p)[0, -1])
        outs = [measure("logits", np.stack(logits), data["reference_logits"], tol, logits=True)]
    else:
        raise ValueError(f"unknown graph kind {kind!r}")
    return GraphParity(name, kind, graph["precision"], reference, {"golden": outs})


def _run(session, names: list[str], feeds: dict, packing: dict | None) -> list:
    """``session.run`` in the unpacked interface. A graph with ``deepstack_packing`` (the
    onnxruntime-genai wrappers) takes each (features, deepstack) input pair as one wide
    input and returns each such output pair as one wide output: pack, run, unpack."""
    if not packing:
        return session.run(names, feeds)
    from ..packing import pack, unpack

    feeds = dict(feeds)
    for packed, (features, deepstack) in packing.get("inputs", {}).items():
        feeds[packed] = pack(feeds.pop(features), feeds.pop(deepstack))
    wide = {packed: pair for packed, pair in packing.get("outputs", {}).items()}
    run_names = [n for n in names if not any(n in pair for pair in wide.values())] + list(wide)
    results = dict(zip(run_names, session.run(run_names, feeds)))
    for packed, (features, deepstack) in wide.items():
        results[features], results[deepstack] = unpack(results.pop(packed), packing["levels"])
    return [results[n] for n in names]
