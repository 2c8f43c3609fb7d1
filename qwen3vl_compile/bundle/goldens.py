"""Re-measuring a bundle's parity with ONNX Runtime alone (no torch, no transformers).

At compile time each graph keeps one input and its PyTorch reference output in
``golden/<graph>.npz``; :func:`check_golden` runs the graph on that input and compares with
the tolerance of this tool's own table (``parity.TOLERANCES``) for the graph's kind and
recorded precision (:func:`table_tolerance`): never the tolerance written in the manifest
being checked, and a precision the table does not know fails.

The text side's golden (``golden/text.json``) reruns the runtime's own text code, so it
lives with that code, in :mod:`qwen3vl_compile.runtime.text_golden`; this module runs graphs
with ONNX Runtime alone and imports nothing of the runtime.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import BundleError
from ..options import PRECISIONS, VISION_PRECISIONS
from .manifest import interface_name
from ..parity import TOLERANCES, GraphParity, measure
from ..ort.session import ort_session


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


MOE_ARCHITECTURES = ("Qwen3VLMoeForConditionalGeneration",)


def table_tolerance(manifest: dict, name: str) -> float:
    """The tolerance ``verify`` applies to graph ``name``'s golden: this tool's table entry
    for the graph's kind and recorded precision (an int4 decoder built with int8 activations,
    ``accuracy_level`` > 0, gets the activations' entry, as its compile-time gate did). A
    wrapper graph (``source_graph``) is judged as its source. BundleError when the table has
    no entry: a precision this qwen3vl-compile does not know."""
    graphs = manifest["graphs"]
    graph = graphs[name]
    source = graphs.get(graph.get("source_graph"), graph)
    kind, precision = graph["kind"], graph["precision"]
    key = (kind, precision)
    if precision not in (*PRECISIONS, *VISION_PRECISIONS) or key not in TOLERANCES:
        known = ", ".join(p for k, p in TOLERANCES if k == kind) or "none"
        raise BundleError(f"graph {name!r}: precision {precision!r} of a {kind} graph is not one this qwen3vl-compile "
                          f"knows ({known})")
    if kind == "decoder" and precision == "int4":
        q = source.get("quantization")
        level = q.get("accuracy_level") if isinstance(q, dict) else None
        if isinstance(level, bool) or level not in (0, 1, 2, 3, 4):
            raise BundleError(f"graph {name!r}: an int4 decoder must record its quantization's accuracy_level (0-4), "
                              f"got {level!r}")
        if level > 0:
            moe = (manifest.get("source") or {}).get("architecture") in MOE_ARCHITECTURES
            key = ("decoder", "int4-activations-moe" if moe else "int4-activations")
    return TOLERANCES[key]


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
    """Graph ``name`` of a bundle's manifest on its recorded golden, judged with this tool's
    tolerance (:func:`table_tolerance`). ``session``: an already created ONNX Runtime
    session of the graph (else one is made)."""
    parity = manifest["parity"][name]
    return check_graph_golden(root, manifest["graphs"][name], parity["golden"], reference=str(parity.get("reference", "")),
                              threads=threads, session=session, tolerance=table_tolerance(manifest, name))


def check_graph_golden(root: Path, graph: dict, golden: dict, *, reference: str = "", threads: int = 0,
                       session=None, tolerance: float | None = None) -> GraphParity:
    """One graph (its manifest entry, ``graph``) run on a golden (``golden``: the npz file
    under ``root``) and measured against the recorded reference output, within
    ``tolerance`` (None: the compile's own in-memory ``golden["tolerance_max_rel"]``; a
    bundle on disk is checked with :func:`check_golden`, which passes the table's)."""
    root = Path(root)
    name = graph["file"].removesuffix(".onnx")
    try:
        with np.load(root / golden["file"]) as npz:
            data = dict(npz)
    except (OSError, ValueError, EOFError) as e:
        raise BundleError(f"{golden['file']}: not a readable golden ({e})") from None
    tol = float(golden["tolerance_max_rel"] if tolerance is None else tolerance)
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
        from ..ort.decoder_session import DecoderSession

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
