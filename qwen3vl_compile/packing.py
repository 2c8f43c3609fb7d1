"""The wide-channel DeepStack layout, in numpy (torch-free).

onnxruntime-genai passes one tensor between its vision, embedding and decoder sessions, so
the bundle's ``genai_*`` graphs carry the K DeepStack levels in extra channels of it:
``packed[..., :H]`` are the features, ``packed[..., H*(1+k):H*(2+k)]`` level k. These helpers
are the host-side twins of ``passes/pack_deepstack.py`` and ``passes/unpack_deepstack.py``.
"""

from __future__ import annotations

import numpy as np


def pack(features: np.ndarray, deepstack: np.ndarray) -> np.ndarray:
    """``features [..., H]`` and ``deepstack [K, ..., H]`` -> ``[..., H*(1+K)]``."""
    levels = deepstack.shape[0]
    if deepstack.shape[1:] != features.shape:
        raise ValueError(f"deepstack {list(deepstack.shape)} does not line up with features {list(features.shape)}")
    moved = np.moveaxis(deepstack, 0, -2).reshape(*features.shape[:-1], levels * features.shape[-1])
    return np.ascontiguousarray(np.concatenate([features, moved], axis=-1), dtype=features.dtype)


def unpack(packed: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """``[..., H*(1+K)]`` -> ``features [..., H]``, ``deepstack [K, ..., H]``."""
    wide = packed.shape[-1]
    if wide % (1 + levels):
        raise ValueError(f"{wide} channels cannot hold features and {levels} DeepStack levels of equal width")
    hidden = wide // (1 + levels)
    levels_last = packed[..., hidden:].reshape(*packed.shape[:-1], levels, hidden)
    return np.ascontiguousarray(packed[..., :hidden]), np.ascontiguousarray(np.moveaxis(levels_last, -2, 0))
