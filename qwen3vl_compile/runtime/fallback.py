"""The PyTorch fallback for image sizes without a bucket: the unpatched Hugging Face vision
tower, fp32, built from the bundle's own ``config.json`` and ``vision_fallback.safetensors``.

This is the only runtime module that imports torch and transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import BundleError


class FallbackVision:
    def __init__(self, config_path: Path, weights_path: Path):
        try:
            import torch
            from safetensors.torch import load_file

            from ..model.vision_tower import build_vision_tower
        except ImportError as e:
            raise BundleError(
                f"this image size has no bucket and the PyTorch fallback needs torch and transformers ({e}); "
                "install qwen3vl-compile[compile], or use --on-miss fit"
            ) from None
        self.torch = torch
        config = json.loads(Path(config_path).read_text())  # already read by the Pipeline
        try:
            state = {k: v.to(torch.float32) for k, v in load_file(str(weights_path)).items()}
        except Exception as e:  # safetensors' SafetensorError: a damaged file (--skip-hash-check)
            raise BundleError(f"{weights_path}: unreadable vision weights ({e})") from None
        try:
            self.model = build_vision_tower(config, state)
        except KeyError as e:
            raise BundleError(f"{weights_path}: vision weights missing: {e}") from None

    def run(self, pixel_values: np.ndarray, grid_thw) -> tuple[np.ndarray, np.ndarray]:
        torch = self.torch
        with torch.no_grad():
            out = self.model(torch.from_numpy(pixel_values), grid_thw=torch.tensor([list(grid_thw)], dtype=torch.int64))
        return out.pooler_output.numpy(), torch.stack(list(out.deepstack_features)).numpy()
