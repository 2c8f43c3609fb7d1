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

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "scripts" / "demo.sh"


def _installed() -> bool:
    stamp = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()[:16]
    return (ROOT / ".venv" / f".installed-{stamp}").is_file()


def _option(text: str, name: str) -> str:
    """The value the demo passes for ``name`` (one occurrence expected)."""
    values = re.findall(rf"{re.escape(name)} (\S+)", text)
    assert len(values) == 1, (name, values)
    return values[0]


def test_demo_image_is_served_by_a_compiled_bucket():
    """What the demo promises without running it: its sample image exists and has the exact
    size of one of the buckets it compiles (so the answer comes from a bucket graph, not the
    fallback), and the output's parent is created first."""
    from PIL import Image

    text = DEMO.read_text()
    buckets = _option(text, "--buckets").split(",")
    with Image.open(ROOT / _option(text, "--image")) as im:
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
    assert (out / "manifest.json").is_file() and (out / "vision_448.onnx").is_file()
    assert "manifest integrity ok" in proc.stdout
    # The sample image (448x448) is served by the 448 bucket, and an answer was streamed.
    assert "bucket 448" in proc.stdout + proc.stderr
    assert not list(out.parent.glob(".tiny.staging-*"))
