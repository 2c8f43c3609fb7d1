"""Hugging Face itself, as the reference the tests and benchmarks compare whole answers with."""

from __future__ import annotations


def make_hf_generate(path, model=None):
    """Greedy token ids from Hugging Face ``generate`` on the checkpoint at ``path`` (unpatched
    transformers in fp32, the checkpoint's own image processor values, chat template and
    token ids), as a function ``(image_paths, prompt, max_new_tokens) -> ids`` cut at the
    first of the checkpoint's eos ids."""
    import json
    from pathlib import Path

    import torch
    from PIL import Image
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

    from qwen3vl_compile.model.checkpoint import Checkpoint

    path = Path(path)
    ck = Checkpoint.open(path)
    model = model if model is not None else ck.load_full_model()
    values = json.loads((path / "preprocessor_config.json").read_text())
    proc = Qwen2VLImageProcessorPil(**{k: v for k, v in values.items() if k not in ("image_processor_type", "processor_class")})
    tok = AutoTokenizer.from_pretrained(path)
    image_id = ck.token_id("image_token_id")
    merge = ck.vision_config["spatial_merge_size"]
    eos = json.loads((path / "generation_config.json").read_text())["eos_token_id"]
    stops = set(eos if isinstance(eos, list) else [eos])

    def generate(image_paths, prompt, max_new_tokens):
        imgs = [Image.open(p).convert("RGB") for p in image_paths]
        content = [{"type": "image"} for _ in imgs] + [{"type": "text", "text": prompt}]
        text = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
        kwargs = {}
        if imgs:
            px = proc(images=imgs, return_tensors="pt")
            counts = (px["image_grid_thw"].prod(-1) // merge**2).tolist()
            parts = text.split("<|image_pad|>")
            text = parts[0] + "".join("<|image_pad|>" * n + p for n, p in zip(counts, parts[1:]))
            kwargs = dict(pixel_values=px["pixel_values"], image_grid_thw=px["image_grid_thw"])
        ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        kwargs["mm_token_type_ids"] = (ids == image_id).int()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, **kwargs)
        gen = out[0, ids.shape[1]:].tolist()
        return next((gen[:i] for i, t in enumerate(gen) if t in stops), gen)

    return generate
