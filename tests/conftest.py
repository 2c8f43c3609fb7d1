"""Shared fixtures: the embedded tiny model (materialised once per machine) and its parts."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_path():
    from qwen3vl_compile.checkpoint import resolve_model_source

    return resolve_model_source("tiny")


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_path):
    from qwen3vl_compile.checkpoint import Checkpoint

    return Checkpoint.open(tiny_path)


@pytest.fixture(scope="session")
def tiny_visual(tiny_checkpoint):
    return tiny_checkpoint.load_vision_tower()


@pytest.fixture(scope="session")
def vision_graphs(tmp_path_factory, tiny_visual):
    """Exported vision graphs of the tiny model, keyed by bucket name (built lazily)."""
    from qwen3vl_compile.buckets import parse_bucket
    from qwen3vl_compile.export.vision import export_vision_bucket

    root = tmp_path_factory.mktemp("vision_graphs")
    cache: dict[str, tuple] = {}

    def get(name: str):
        if name not in cache:
            bucket = parse_bucket(name)
            report = export_vision_bucket(tiny_visual, bucket, root)
            cache[name] = (root / report["file"], bucket, report)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def hf_generate(tiny_checkpoint, tiny_path):
    """Greedy token ids from Hugging Face ``generate`` on the tiny model (unpatched
    transformers, the checkpoint's own image processor values and chat template), as a
    function ``(image_paths, prompt, max_new_tokens) -> ids`` cut at the first stop token."""
    import json

    import torch
    from PIL import Image
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

    model = tiny_checkpoint.load_full_model()
    values = json.loads((tiny_path / "preprocessor_config.json").read_text())
    proc = Qwen2VLImageProcessorPil(**{k: v for k, v in values.items() if k not in ("image_processor_type", "processor_class")})
    tok = AutoTokenizer.from_pretrained(tiny_path)

    def generate(image_paths, prompt, max_new_tokens):
        imgs = [Image.open(p).convert("RGB") for p in image_paths]
        content = [{"type": "image"} for _ in imgs] + [{"type": "text", "text": prompt}]
        text = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
        kwargs = {}
        if imgs:
            px = proc(images=imgs, return_tensors="pt")
            counts = (px["image_grid_thw"].prod(-1) // 4).tolist()
            parts = text.split("<|image_pad|>")
            text = parts[0] + "".join("<|image_pad|>" * n + p for n, p in zip(counts, parts[1:]))
            kwargs = dict(pixel_values=px["pixel_values"], image_grid_thw=px["image_grid_thw"])
        ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        kwargs["mm_token_type_ids"] = (ids == 151655).int()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, **kwargs)
        gen = out[0, ids.shape[1]:].tolist()
        stops = {151645, 151643}
        return next((gen[:i] for i, t in enumerate(gen) if t in stops), gen)

    return generate


@pytest.fixture(scope="session")
def genai_bundle(tmp_path_factory):
    """The tiny model at fp32 with a 448 bucket, compiled for onnxruntime-genai too: the CLI
    adds the any-size vision graph that --target ort-genai needs."""
    from qwen3vl_compile.cli import main as compile_main

    out = tmp_path_factory.mktemp("genai") / "bundle"
    rc = compile_main(["--model", "tiny", "--buckets", "448", "--target", "ort-genai", "--precision", "fp32", "-o", str(out), "-q"])
    assert rc == 0
    return out
