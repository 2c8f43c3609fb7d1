"""The README's first command, ``bash scripts/demo.sh``, on an output path whose parent does not exist yet.

It reuses the ``.venv`` that ``scripts/test.sh`` installed (its install step is then a no-op); run
outside that set-up, the test is skipped rather than installing a second environment.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from qwen3vl_compile.presets.shapes import SAMPLE_ANSWER, SAMPLE_PROMPT, sample_scene
from qwen3vl_compile.runtime.eval import normalize

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "scripts" / "demo.sh"


def _installed() -> bool:
    stamp = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()[:16]
    return (ROOT / ".venv" / f".installed-{stamp}").is_file()


def _option(text: str, name: str) -> str:
    """The value the demo passes for ``name`` (one occurrence expected)."""
    values = _options(text, name)
    assert len(values) == 1, (name, values)
    return values[0]


def _options(text: str, name: str) -> list[str]:
    return re.findall(rf"{re.escape(name)} (\S+)", text)


def test_demo_asks_the_sample_question_about_the_sample_scenes():
    """The committed sample images are the generator's own scenes, and the demo asks their question."""
    from PIL import Image

    text = DEMO.read_text()
    images = _options(text, "--image")
    assert len(images) == 2
    for i, path in enumerate(images):
        with Image.open(ROOT / path) as im:
            assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(sample_scene(i)))
    assert f'--prompt "{SAMPLE_PROMPT}"' in text


def test_demo_images_are_served_by_a_compiled_bucket():
    """What the demo promises without running it: its sample images have the exact size of
    one of the buckets it compiles (so the answer comes from a bucket graph, not the
    fallback), and the output's parent is created first."""
    from PIL import Image

    text = DEMO.read_text()
    buckets = _option(text, "--buckets").split(",")
    for path in _options(text, "--image"):
        with Image.open(ROOT / path) as im:
            w, h = im.size
        assert (str(h) if h == w else f"{h}x{w}") in buckets, (w, h, buckets)
    assert text.index('mkdir -p "$(dirname "$OUT")"') < text.index('qwen3vl-compile --model')


# The README's first command, end to end (install check + compile + answer).
@pytest.mark.slow
@pytest.mark.skipif(not _installed(), reason="scripts/install.sh has not installed .venv for this pyproject.toml")
def test_demo_script_compiles_and_answers(tmp_path):
    out = tmp_path / "not-yet" / "tiny"
    proc = subprocess.run(["bash", str(DEMO)], cwd=tmp_path, env={**os.environ, "OUT": str(out)},
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "manifest.json").is_file() and (out / "vision_256.onnx").is_file()
    assert "manifest integrity ok" in proc.stdout
    # The sample images (256x256) are served by the 256 bucket, and the answer is the right one.
    assert "[image 0: grid 16x16, bucket 256]" in proc.stderr and "[image 1: grid 16x16, bucket 256]" in proc.stderr
    answer = proc.stdout.strip().splitlines()[-1]
    assert normalize(answer) == normalize(SAMPLE_ANSWER), proc.stdout[-500:]
    assert not list(out.parent.glob(".tiny.staging-*"))
