"""Re-measuring a bundle's parity with ONNX Runtime alone (no torch, no transformers).

At compile time each graph keeps one input and its PyTorch reference output in
``golden/<graph>.npz``; :func:`check_golden` runs the graph on that input and compares with
the tolerance of this tool's own table (``parity.TOLERANCES``) for the graph's kind and
recorded precision (:func:`table_tolerance`): never the tolerance written in the manifest
being checked, and a precision the table does not know fails.

The text side has a golden too (``golden/text.json``, :func:`text_golden`): fixed prompts
with images rendered through the bundle's chat template and tokenizer (text and token ids),
the stop tokens, the vision placeholder ids, and the processed grid and pixels of fixed
image sizes, as the runtime's own code computed them at compile time;
:func:`check_text_golden` recomputes it from the bundle's listed files and compares exactly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

import json

from ..errors import BundleError
from ..options import PRECISIONS
from .manifest import BundleFiles, interface_name
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
    if precision not in PRECISIONS or key not in TOLERANCES:
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


# -- the text side's golden -----------------------------------------------------------------

TEXT_GOLDEN = "golden/text.json"
# (prompt, system prompt, image sizes (height, width)): rendered through the bundle's chat
# template and tokenizer, each image's pads expanded to its processed grid's token count.
TEXT_GOLDEN_PROMPTS = (
    ("Describe this image in one sentence.", None, ((448, 448),)),
    ("What differs between these two pictures?", "You are a careful assistant.", ((300, 500), (64, 1000))),
    ("Write 3 words about café crème, 東京 and 🙂.", None, ()),
)
# A fixed synthetic image, (height, width), run through the image processor.
TEXT_GOLDEN_PIXELS = (100, 150)


def _synthetic_image(height: int, width: int) -> np.ndarray:
    i, j = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    return np.stack([(i * 7 + j * 13 + c * 50) % 256 for c in range(3)], axis=-1).astype(np.uint8)


def text_golden(text) -> dict:
    """What the text side computes, from a :class:`~qwen3vl_compile.runtime.text_side.TextSide`
    (the runtime's own objects): one JSON object, compared exactly."""
    from ..runtime.chat import build_messages, image_token_count
    from ..runtime.preprocess import grid_for_size, preprocess

    prompts = []
    for prompt, system, sizes in TEXT_GOLDEN_PROMPTS:
        grids = [list(grid_for_size(h, w, text.processor)) for h, w in sizes]
        counts = [image_token_count(g, text.processor.merge_size) for g in grids]
        ids = text.chat.encode(prompt, counts, system)[0].tolist()
        prompts.append({
            "prompt": prompt, "system": system, "image_sizes": [list(s) for s in sizes], "grids": grids,
            "tokens_per_image": counts,
            "rendered": text.chat.render(build_messages(prompt, len(sizes), system)),
            "input_ids": ids,
            "decoded": text.chat.decode(ids),
        })
    processed = preprocess(_synthetic_image(*TEXT_GOLDEN_PIXELS), text.processor)
    pv = processed.pixel_values.astype(np.float64)
    weights = np.arange(1, pv.size + 1, dtype=np.float64).reshape(pv.shape) / pv.size
    return {
        "prompts": prompts,
        "stop_ids": sorted(int(i) for i in text.chat.stop_ids),
        "image_token_id": text.image_token_id,
        "video_token_id": text.video_token_id,
        "merge_size": text.merge,
        "pixels": {
            "image_size": list(TEXT_GOLDEN_PIXELS), "resized": list(processed.resized),
            "grid": list(processed.grid_thw), "shape": list(processed.pixel_values.shape),
            "sum": float(pv.sum()), "sum_of_squares": float((pv * pv).sum()), "weighted_sum": float((pv * weights).sum()),
        },
    }


def write_text_golden(root: Path, processor: dict) -> dict:
    """At compile time, after the tokenizer, template and configs are in ``root``: the text
    golden computed by the runtime's code into ``golden/text.json``; returns the manifest's
    ``text_golden`` section."""
    from ..runtime.text_side import TextSide

    golden = text_golden(TextSide.load(BundleFiles.directory(root), processor))
    path = Path(root) / TEXT_GOLDEN
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(golden, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return {"file": TEXT_GOLDEN, "prompts": len(golden["prompts"])}


def _differences(recorded, now, where: str = "") -> list[str]:
    """Where two golden JSON values differ (floats within 1e-9 relative), one line each."""
    if isinstance(recorded, dict) and isinstance(now, dict):
        out = []
        for k in sorted(set(recorded) | set(now), key=str):
            out += _differences(recorded.get(k), now.get(k), f"{where}.{k}" if where else str(k))
        return out
    if isinstance(recorded, list) and isinstance(now, list):
        for i, (a, b) in enumerate(zip(recorded, now)):
            diff = _differences(a, b, f"{where}[{i}]")
            if diff:
                return diff
        return [] if len(recorded) == len(now) else [f"{where}: {len(now)} entries, the compile recorded {len(recorded)}"]
    if isinstance(recorded, float) and isinstance(now, float) and not isinstance(recorded, bool):
        if abs(recorded - now) <= 1e-9 * max(abs(recorded), abs(now), 1e-30):
            return []
    elif recorded == now and type(recorded) is type(now):
        return []
    show = lambda v: (repr(v)[:60] + "...") if len(repr(v)) > 60 else repr(v)  # noqa: E731
    return [f"{where} is {show(now)}, the compile recorded {show(recorded)}"]


def check_text_golden(root: Path, manifest: dict) -> list[str]:
    """The text golden recomputed from the bundle's listed files: one message per
    difference (empty: identical)."""
    from ..errors import Qwen3VLCompileError
    from ..runtime.text_side import TextSide

    files = BundleFiles.of_manifest(root, manifest)
    section = manifest.get("text_golden")
    if section is None:
        return ["the bundle has no text golden (compiled by an older qwen3vl-compile): its tokenizer, chat template "
                "and processor settings cannot be checked"]
    path = files.path(section["file"])
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return [f"{section['file']}: not readable JSON ({e})"]
    try:
        now = json.loads(json.dumps(text_golden(TextSide.load(files, manifest.get("processor") or {}))))
    except (Qwen3VLCompileError, ValueError, TypeError, KeyError) as e:
        return [f"the text side cannot be rebuilt from the bundle's files ({e})"]
    return _differences(recorded, now)
