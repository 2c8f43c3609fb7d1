"""The text side's golden (``golden/text.json``): fixed prompts with images rendered through
the bundle's chat template and tokenizer (text and token ids), the stop tokens, the vision
placeholder ids, and the processed grid and pixels of fixed image sizes, as the runtime's own
code (:class:`~.text_side.TextSide`) computed them at compile time
(:func:`write_text_golden`); :func:`check_text_golden` recomputes it from the bundle's
listed files and compares exactly. The graphs' goldens, which need ONNX Runtime alone, are
:mod:`qwen3vl_compile.bundle.goldens`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..bundle.manifest import BundleFiles
from ..errors import Qwen3VLCompileError
from .chat import build_messages, image_token_count
from .preprocess import grid_for_size, preprocess
from .text_side import TextSide

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
    """What the text side computes, from a :class:`~.text_side.TextSide` (the runtime's own
    objects): one JSON object, compared exactly."""
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
