"""Greedy generation with onnxruntime-genai's own pipeline on a ``--target ort-genai`` bundle
(its processor, vision, embedding and decoder sessions, its search): what the tests and the
benchmarks compare our runtime with. Needs ``pip install 'qwen3vl-compile[genai]'``."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence


def genai_greedy(model, text: str, image_paths: Sequence[Path | str], max_new_tokens: int, stop_ids) -> list[int]:
    """Token ids for ``text`` (the rendered chat prompt, one ``<|image_pad|>`` per image: the
    processor expands it) about ``image_paths``, cut before the first of ``stop_ids``."""
    import onnxruntime_genai as og

    processor = model.create_multimodal_processor()
    inputs = processor(text, images=og.Images.open(*map(str, image_paths)) if image_paths else None)
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=4096)
    gen = og.Generator(model, params)
    gen.set_inputs(inputs)
    out: list[int] = []
    while len(out) < max_new_tokens and not gen.is_done():
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
    return next((out[:i] for i, t in enumerate(out) if t in stop_ids), out)
