"""Shared fixtures: the embedded tiny model (materialised once per machine) and its parts."""

from __future__ import annotations

import pytest

from qwen3vl_compile.model.hf_reference import make_hf_generate


@pytest.fixture(scope="session")
def tiny_path():
    from qwen3vl_compile.model.checkpoint import resolve_model_source

    return resolve_model_source("tiny-random")


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_path):
    from qwen3vl_compile.model.checkpoint import Checkpoint

    return Checkpoint.open(tiny_path)


@pytest.fixture(scope="session")
def tiny_visual(tiny_checkpoint):
    return tiny_checkpoint.load_vision_tower()


@pytest.fixture(scope="session")
def vision_graphs(tmp_path_factory, tiny_visual):
    """Exported vision graphs of the tiny model, keyed by bucket name (built lazily):
    ``get(name)`` returns ``(onnx path, bucket, GraphEntry)``."""
    from qwen3vl_compile.buckets import parse_bucket
    from qwen3vl_compile.export.vision import export_vision_bucket

    root = tmp_path_factory.mktemp("vision_graphs")
    cache: dict[str, tuple] = {}

    def get(name: str):
        if name not in cache:
            bucket = parse_bucket(name)
            entry = export_vision_bucket(tiny_visual, bucket, root)
            cache[name] = (root / entry.file, bucket, entry)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def hf_generate(tiny_checkpoint, tiny_path):
    """``make_hf_generate`` on the tiny model."""
    return make_hf_generate(tiny_path)


@pytest.fixture(scope="session")
def text_bundle(tmp_path_factory):
    """A text-only fp32 bundle of the tiny model (no vision graphs: seconds to build), for
    tests of the bundle and runtime that need no image. Tests that change it work on a copy."""
    from qwen3vl_compile.cli import main as compile_main

    out = tmp_path_factory.mktemp("text") / "bundle"
    assert compile_main(["--model", "tiny-random", "--graphs", "embedding,decoder", "--precision", "fp32", "-o", str(out), "-q"]) == 0
    return out


@pytest.fixture(scope="session")
def genai_bundle(tmp_path_factory):
    """The tiny model at fp32 with a 448 bucket, compiled for onnxruntime-genai too: the CLI
    adds the any-size vision graph that --target ort-genai needs."""
    from qwen3vl_compile.cli import main as compile_main

    out = tmp_path_factory.mktemp("genai") / "bundle"
    rc = compile_main(["--model", "tiny-random", "--buckets", "448", "--target", "ort-genai", "--precision", "fp32", "-o", str(out), "-q"])
    assert rc == 0
    return out


@pytest.fixture(scope="session")
def noise_images(tmp_path_factory):
    """``noise_images((w, h), ...)``: PNG files of seeded uniform noise, one per size."""
    import numpy as np
    from PIL import Image

    d = tmp_path_factory.mktemp("noise")

    def make(*sizes):
        out = []
        for seed, (w, h) in enumerate(sizes):
            path = d / f"{w}x{h}-{seed}.png"
            if not path.exists():
                Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
            out.append(path)
        return out

    return make


@pytest.fixture(scope="session")
def vision_bundle(tmp_path_factory):
    """The tiny model at fp32 with two small buckets (224 and 256): the smallest bundle with
    vision graphs (about 15 s on 2 cores). Tests that change it work on a copy."""
    from qwen3vl_compile.cli import main as compile_main

    out = tmp_path_factory.mktemp("vision") / "bundle"
    assert compile_main(["--model", "tiny-random", "--buckets", "224,256", "--precision", "fp32", "-o", str(out), "-q"]) == 0
    return out


@pytest.fixture
def text_copy(text_bundle, tmp_path):
    """A copy of the text-only bundle, for tests that change it."""
    import shutil

    dst = tmp_path / "bundle"
    shutil.copytree(text_bundle, dst)
    return dst


@pytest.fixture
def vision_copy(vision_bundle, tmp_path):
    """A copy of the bundle with two small buckets, for tests that change it."""
    import shutil

    dst = tmp_path / "bundle"
    shutil.copytree(vision_bundle, dst)
    return dst
