"""Hugging Face itself, as the reference the tests and benchmarks compare whole answers with."""

from __future__ import annotations


def hf_video_processing_module():
    """transformers' ``video_processing_qwen3_vl`` module. Without torchvision (whose PyPI
    wheels do not load against the CPU torch), transformers' lazy package hands out a dummy
    that refuses every attribute, so the file is loaded directly: its pure functions
    (``smart_resize``, ``Qwen3VLVideoProcessor.sample_frames`` and ``patchify``) need only torch."""
    import importlib.util
    import os
    import sys

    name = "transformers.models.qwen3_vl._video_processing_qwen3_vl_reference"
    if name in sys.modules:
        return sys.modules[name]
    import transformers.models.qwen3_vl as package

    spec = importlib.util.spec_from_file_location(
        name, os.path.join(os.path.dirname(package.__file__), "video_processing_qwen3_vl.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # auto_docstring looks the class's file up through sys.modules
    spec.loader.exec_module(module)
    return module


def hf_video_inputs(frames, fps: float, video_config: dict):
    """``(pixel_values_videos, video_grid_thw, prompt text for its <|video_pad|>)`` of one video
    (``frames``: ``T x H x W x 3`` uint8, ``fps``: its frame rate) by Hugging Face's own
    pieces: ``Qwen3VLVideoProcessor.sample_frames`` and ``smart_resize`` with the checkpoint's
    ``video_preprocessor_config.json`` values, ``patchify``, and ``Qwen3VLProcessor.replace_video_token``
    (with the sampled frames' metadata) for the text. The one step not Hugging Face's: frames
    are resized with Pillow bicubic (its processor uses torchvision, which is not loadable here)."""
    import types

    import numpy as np
    import torch
    from PIL import Image
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
    from transformers.video_utils import VideoMetadata

    hf = hf_video_processing_module()
    cls = hf.Qwen3VLVideoProcessor
    size = video_config.get("size") or cls.size
    cfg = types.SimpleNamespace(
        fps=video_config.get("fps", cls.fps), min_frames=video_config.get("min_frames", cls.min_frames),
        max_frames=video_config.get("max_frames", cls.max_frames),
        patch_size=video_config.get("patch_size", cls.patch_size), merge_size=video_config.get("merge_size", cls.merge_size),
        temporal_patch_size=video_config.get("temporal_patch_size", cls.temporal_patch_size),
        mean=np.asarray(video_config.get("image_mean", cls.image_mean)), std=np.asarray(video_config.get("image_std", cls.image_std)),
    )
    total = len(frames)
    indices = cls.sample_frames(cfg, VideoMetadata(total_num_frames=total, fps=fps))
    picked = np.asarray(frames)[np.asarray(indices)]
    t, h, w, _ = picked.shape
    rh, rw = hf.smart_resize(t, h, w, temporal_factor=cfg.temporal_patch_size, factor=cfg.patch_size * cfg.merge_size,
                             min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"])
    resized = np.stack([np.asarray(Image.fromarray(f).resize((rw, rh), Image.Resampling.BICUBIC)) for f in picked])
    x = ((resized.astype(np.float32) / 255.0 - cfg.mean.astype(np.float32)) / cfg.std.astype(np.float32))
    x = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32))[None]
    patches, gt, gh, gw = cls.patchify(None, x, cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size)
    grid = torch.tensor([[gt, gh, gw]])
    fake = types.SimpleNamespace(video_processor=types.SimpleNamespace(merge_size=cfg.merge_size,
                                                                       temporal_patch_size=cfg.temporal_patch_size),
                                 video_token="<|video_pad|>", vision_start_token="<|vision_start|>",
                                 vision_end_token="<|vision_end|>")
    fake._calculate_timestamps = lambda *a, **k: Qwen3VLProcessor._calculate_timestamps(fake, *a, **k)
    meta = VideoMetadata(total_num_frames=total, fps=fps, frames_indices=[int(i) for i in indices])
    text = Qwen3VLProcessor.replace_video_token(fake, {"video_grid_thw": grid, "video_metadata": [meta]}, 0)
    return patches[0].to(torch.float32), grid, text


def make_hf_generate(path, model=None):
    """Greedy token ids from Hugging Face ``generate`` on the checkpoint at ``path`` (unpatched
    transformers in fp32, the checkpoint's own image processor values, chat template and
    token ids), as a function ``(image_paths, prompt, max_new_tokens, videos=()) -> ids`` cut
    at the first of the checkpoint's eos ids. ``videos``: ``(frames, fps)`` pairs, prepared
    by :func:`hf_video_inputs` with the checkpoint's video processor values; they follow the
    images in the prompt."""
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

    video_file = path / "video_preprocessor_config.json"
    video_config = json.loads(video_file.read_text()) if video_file.is_file() else {}
    video_id = ck.token_id("video_token_id")

    def generate(image_paths, prompt, max_new_tokens, videos=()):
        imgs = [Image.open(p).convert("RGB") for p in image_paths]
        content = ([{"type": "image"} for _ in imgs] + [{"type": "video"} for _ in videos]
                   + [{"type": "text", "text": prompt}])
        text = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
        kwargs = {}
        if imgs:
            px = proc(images=imgs, return_tensors="pt")
            counts = (px["image_grid_thw"].prod(-1) // merge**2).tolist()
            parts = text.split("<|image_pad|>")
            text = parts[0] + "".join("<|image_pad|>" * n + p for n, p in zip(counts, parts[1:]))
            kwargs = dict(pixel_values=px["pixel_values"], image_grid_thw=px["image_grid_thw"])
        if videos:
            prepared = [hf_video_inputs(frames, fps, video_config) for frames, fps in videos]
            parts = text.split("<|video_pad|>")
            text = parts[0] + "".join(v[2] + p for v, p in zip(prepared, parts[1:]))
            kwargs.update(pixel_values_videos=torch.cat([v[0] for v in prepared]),
                          video_grid_thw=torch.cat([v[1] for v in prepared]))
        ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        kwargs["mm_token_type_ids"] = (ids == image_id).int() + 2 * (ids == video_id).int()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, **kwargs)
        gen = out[0, ids.shape[1]:].tolist()
        return next((gen[:i] for i, t in enumerate(gen) if t in stops), gen)

    return generate
