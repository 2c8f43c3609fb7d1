"""Synthetic visual question answering that needs the picture: what the embedded ``tiny``
model is trained on, and the held-out set the accuracy harness measures.

Each item is one or two drawn images, a question and a one-word answer:

- ``color``: "What color is the circle?" (one shape, or several of different kinds)
- ``shape``: "What shape is the red object?"
- ``count``: "How many shapes are there?" (1 to 6)
- ``position``: "Is the red circle left or right of the blue square?" (or above / below)
- ``digit``: "What number is shown?" (a large seven-segment digit)
- ``compare``: two images, "Which image has more shapes, the first or the second?"

Everything is drawn with Pillow's polygon and ellipse primitives (no fonts) from a seeded
``numpy`` generator, so the same seed gives the same pixels on any machine. Image sizes are
multiples of 32 (the patch grid) and vary, so that items fall on and off the buckets.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLORS = {
    "red": (215, 35, 35),
    "green": (40, 160, 60),
    "blue": (40, 80, 215),
    "yellow": (230, 200, 30),
    "purple": (140, 60, 170),
    "orange": (240, 135, 25),
}
SHAPES = ("circle", "square", "triangle")
KINDS = ("color", "shape", "count", "position", "digit", "compare")
# Training sizes (height, width); the held-out set adds sizes never trained on.
TRAIN_SIZES = ((224, 224), (192, 256), (256, 224), (224, 288))
HELDOUT_SIZES = (*TRAIN_SIZES, (448, 448), (256, 256), (320, 224))
# Segments a..g of a seven-segment digit, as (x0, y0, x1, y1) in a 4 x 7 cell.
_SEGMENTS = {"a": (0, 0, 4, 1), "b": (3, 0, 4, 3.5), "c": (3, 3.5, 4, 7), "d": (0, 6, 4, 7),
             "e": (0, 3.5, 1, 7), "f": (0, 0, 1, 3.5), "g": (0, 3, 4, 4)}
_DIGITS = {"0": "abcdef", "1": "bc", "2": "abdeg", "3": "abcdg", "4": "bcfg", "5": "acdfg", "6": "acdefg",
           "7": "abc", "8": "abcdefg", "9": "abcdfg"}


@dataclasses.dataclass
class Item:
    images: list[Image.Image]
    prompt: str
    answer: str
    kind: str

    def to_json(self, image_names: list[str]) -> dict:
        return {"images": image_names, "prompt": self.prompt, "answer": self.answer, "kind": self.kind}


@dataclasses.dataclass(frozen=True)
class _Obj:
    shape: str
    color: str
    cx: float
    cy: float
    r: float


def _canvas(rng, size) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    h, w = size
    tone = tuple(int(v) for v in rng.integers(225, 256, 3))
    img = Image.new("RGB", (w, h), tone)
    return img, ImageDraw.Draw(img)


def _draw(d: ImageDraw.ImageDraw, o: _Obj) -> None:
    fill = COLORS[o.color]
    if o.shape == "circle":
        d.ellipse((o.cx - o.r, o.cy - o.r, o.cx + o.r, o.cy + o.r), fill=fill)
    elif o.shape == "square":
        s = o.r * 0.9
        d.rectangle((o.cx - s, o.cy - s, o.cx + s, o.cy + s), fill=fill)
    else:
        d.polygon([(o.cx, o.cy - o.r), (o.cx - o.r, o.cy + 0.8 * o.r), (o.cx + o.r, o.cy + 0.8 * o.r)], fill=fill)


def _place(rng, size, specs: list[tuple[str, str]]) -> list[_Obj] | None:
    """Non-overlapping objects for (shape, color) specs, or None when they do not fit."""
    h, w = size
    out: list[_Obj] = []
    for shape, color in specs:
        for _ in range(200):
            r = float(rng.uniform(14, 26))
            cx, cy = float(rng.uniform(r + 4, w - r - 4)), float(rng.uniform(r + 4, h - r - 4))
            if all((cx - o.cx) ** 2 + (cy - o.cy) ** 2 > (r + o.r + 6) ** 2 for o in out):
                out.append(_Obj(shape, color, cx, cy, r))
                break
        else:
            return None
    return out


def _scene(rng, size, specs) -> tuple[Image.Image, list[_Obj]]:
    while True:
        objs = _place(rng, size, specs)
        if objs is not None:
            img, d = _canvas(rng, size)
            for o in objs:
                _draw(d, o)
            return img, objs


def _pick(rng, seq):
    return seq[int(rng.integers(len(seq)))]


def _distinct_specs(rng, n: int) -> list[tuple[str, str]]:
    """n objects with pairwise different shapes and colors (n <= 3)."""
    shapes = list(rng.permutation(SHAPES))[:n]
    colors = list(rng.permutation(list(COLORS)))[:n]
    return [(str(s), str(c)) for s, c in zip(shapes, colors)]


def _item(rng, kind: str, sizes) -> Item:
    size = _pick(rng, sizes)
    if kind == "color":
        specs = _distinct_specs(rng, int(rng.integers(1, 4)))
        img, objs = _scene(rng, size, specs)
        target = _pick(rng, objs)
        return Item([img], f"What color is the {target.shape}?", target.color, kind)
    if kind == "shape":
        specs = _distinct_specs(rng, int(rng.integers(1, 4)))
        img, objs = _scene(rng, size, specs)
        target = _pick(rng, objs)
        return Item([img], f"What shape is the {target.color} object?", target.shape, kind)
    if kind == "count":
        n = int(rng.integers(1, 7))
        specs = [(_pick(rng, SHAPES), _pick(rng, list(COLORS))) for _ in range(n)]
        img, _ = _scene(rng, size, specs)
        return Item([img], "How many shapes are there?", str(n), kind)
    if kind == "position":
        while True:
            img, (a, b) = _scene(rng, size, _distinct_specs(rng, 2))
            horizontal = bool(rng.integers(2))
            gap = (b.cx - a.cx) if horizontal else (b.cy - a.cy)
            if abs(gap) > a.r + b.r:  # unambiguous
                break
        if horizontal:
            answer = "left" if gap > 0 else "right"
            q = f"Is the {a.color} {a.shape} left or right of the {b.color} {b.shape}?"
        else:
            answer = "above" if gap > 0 else "below"
            q = f"Is the {a.color} {a.shape} above or below the {b.color} {b.shape}?"
        return Item([img], q, answer, kind)
    if kind == "digit":
        digit = str(int(rng.integers(10)))
        img, d = _canvas(rng, size)
        h, w = size
        unit = float(rng.uniform(0.08, 0.11)) * h
        x0 = float(rng.uniform(4, w - 4 * unit - 4))
        y0 = float(rng.uniform(4, h - 7 * unit - 4))
        color = COLORS[_pick(rng, ["red", "green", "blue", "purple"])]
        for seg in _DIGITS[digit]:
            a, b, c, e = _SEGMENTS[seg]
            d.rectangle((x0 + a * unit, y0 + b * unit, x0 + c * unit, y0 + e * unit), fill=color)
        return Item([img], "What number is shown?", digit, kind)
    if kind == "compare":
        n1 = int(rng.integers(1, 7))
        n2 = int(_pick(rng, [k for k in range(1, 7) if k != n1]))
        imgs = []
        for n in (n1, n2):
            specs = [(_pick(rng, SHAPES), _pick(rng, list(COLORS))) for _ in range(n)]
            imgs.append(_scene(rng, _pick(rng, sizes), specs)[0])
        return Item(imgs, "Which image has more shapes, the first or the second?", "first" if n1 > n2 else "second", kind)
    raise ValueError(f"unknown kind {kind!r}")


def items(seed: int, n: int, sizes=TRAIN_SIZES, kinds=KINDS):
    """``n`` items from ``seed``, kinds in turn (so every kind is equally represented)."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        yield _item(rng, kinds[i % len(kinds)], sizes)


def write_set(out: Path, seed: int, n: int, sizes=HELDOUT_SIZES) -> Path:
    """Images as PNG under ``out/images`` and ``out/items.jsonl`` (paths relative to it)."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, item in enumerate(items(seed, n, sizes)):
        names = []
        for j, img in enumerate(item.images):
            name = f"images/{i:05d}-{j}.png"
            img.save(out / name)
            names.append(name)
        lines.append(json.dumps(item.to_json(names)))
    path = out / "items.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


# The demo's images and question (qwen3vl_compile/assets/sample.png and sample2.png, asked in
# that order by scripts/demo.sh).
SAMPLE_PROMPT = "Which image has more shapes, the first or the second?"
SAMPLE_ANSWER = "second"
_SAMPLE_SCENES = (
    (_Obj("circle", "red", 70, 172, 26), _Obj("square", "blue", 184, 184, 24), _Obj("triangle", "green", 136, 66, 26)),
    (_Obj("square", "orange", 50, 50, 22), _Obj("circle", "purple", 130, 60, 22), _Obj("triangle", "yellow", 205, 55, 22),
     _Obj("circle", "green", 60, 190, 22), _Obj("square", "red", 135, 180, 22), _Obj("triangle", "blue", 205, 195, 22)),
)


def sample_scene(index: int = 0) -> Image.Image:
    """The demo's fixed 256x256 scenes (a size the processor keeps as it is): three shapes
    (``index`` 0) and six shapes (``index`` 1)."""
    img = Image.new("RGB", (256, 256), (244, 244, 240))
    d = ImageDraw.Draw(img)
    for o in _SAMPLE_SCENES[index]:
        _draw(d, o)
    return img


# The seed of the held-out set; training uses others (see scripts/train_tiny.py).
HELDOUT_SEED = 20261201


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m qwen3vl_compile.presets.shapes",
                                description="Write the synthetic held-out VQA set (images + items.jsonl).")
    p.add_argument("out", type=Path)
    p.add_argument("-n", type=int, default=600, help="number of items (default 600)")
    p.add_argument("--seed", type=int, default=HELDOUT_SEED)
    args = p.parse_args(argv)
    path = write_set(args.out, args.seed, args.n)
    print(f"wrote {path} ({args.n} items)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
