"""Re-measuring a bundle's parity with ONNX Runtime alone (no torch, no transformers).

At compile time each graph keeps one input and its PyTorch reference output in
``golden/<graph>.npz``; :func:`check_golden` runs the graph on that input and compares with
the tolerance recorded in the manifest: the precision's gate where there is one (fp32:
1e-4), and for int4 (reported, not gated, at compile time) "no worse than measured at
compile time", with a margin for other CPUs' int8 kernels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .verify import TOLERANCES, GraphParity, measure


def golden_tolerance(kind: str, precision: str, compile_rel: float) -> float:
    gate = TOLERANCES.get((kind, precision), float("inf"))
    if np.isfinite(gate):
        return gate
    return float(f"{max(compile_rel * 1.25, compile_rel + 1e-3):.3e}")


def _session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def check_golden(root: Path, manifest: dict, name: str, *, threads: int = 0) -> GraphParity:
    root = Path(root)
    graph = manifest["graphs"][name]
    entry = manifest["parity"][name]["golden"]
    data = dict(np.load(root / entry["file"]))
    tol = float(entry["tolerance_max_rel"])
    path = root / graph["file"]
    kind = graph["kind"]
    if kind == "vision":
        from .export.vision import pixel_values_from_u8

        inputs = {"pixel_values": pixel_values_from_u8(data["pixel_u8"])}
        if graph.get("dynamic"):  # the any-size graph also takes the grid(s) it was checked on
            inputs["image_grid_thw"] = data["image_grid_thw"].astype(np.int64)
        feats, deep = _session(path, threads).run(["image_features", "deepstack_features"], inputs)
        outs = [measure("image_features", feats, data["image_features"], tol),
                measure("deepstack_features", deep, data["deepstack_features"], tol)]
    elif kind == "embedding":
        embeds, deep = _session(path, threads).run(
            ["inputs_embeds", "deepstack_embeds"],
            {k: data[k] for k in ("input_ids", "image_features", "deepstack_features")},
        )
        outs = [measure("inputs_embeds", embeds, data["inputs_embeds"], tol),
                measure("deepstack_embeds", deep, data["deepstack_embeds"], tol)]
    elif kind == "decoder":
        from .runtime.decoder_session import DecoderSession

        s = DecoderSession(path, max_length=256, session=_session(path, threads))
        logits = [s.run(data["prefill_embeds"], data["prefill_positions"], data["prefill_deepstack"])[0, -1]]
        for e, p in zip(data["step_embeds"], data["step_positions"]):
            logits.append(s.run(e, p)[0, -1])
        outs = [measure("logits", np.stack(logits), data["reference_logits"], tol, logits=True)]
    else:
        raise ValueError(f"unknown graph kind {kind!r}")
    return GraphParity(name, kind, graph["precision"], manifest["parity"][name]["reference"], {"golden": outs})
