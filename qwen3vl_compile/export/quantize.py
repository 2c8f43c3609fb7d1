"""Weight-only INT4 block quantization for MatMulNBits, with ONNX Runtime's own C++ routine
(the one its MatMulNBitsQuantizer uses), one tensor at a time.

Symmetric: no zero points (MatMulNBits then uses 8), scales fp32 per block of ``block_size``
input elements.
"""

from __future__ import annotations

import numpy as np


def quantize_int4(weight_kn: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``weight_kn``: fp32 [K, N] (ONNX MatMul's B). Returns packed uint8 [N, K/bs, bs/2]
    and scales fp32 [N, K/bs]."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    w = np.ascontiguousarray(weight_kn, dtype=np.float32)
    k, n = w.shape
    k_blocks = (k + block_size - 1) // block_size
    if k_blocks * block_size != k:
        w = np.pad(w, ((0, k_blocks * block_size - k), (0, 0)))
    packed = np.zeros((n, k_blocks, block_size // 2), dtype=np.uint8)
    scales = np.zeros((n, k_blocks), dtype=np.float32)
    zero_points = np.zeros((n, (k_blocks + 1) // 2), dtype=np.uint8)
    quantize_matmul_4bits(packed, w, scales, zero_points, block_size, n, k, True)
    return packed, scales


def dequantize_int4(packed: np.ndarray, scales: np.ndarray, k: int) -> np.ndarray:
    """Inverse, for tests: fp32 [K, N]."""
    n, k_blocks, half = packed.shape
    lo = (packed & 0x0F).astype(np.int8)
    hi = (packed >> 4).astype(np.int8)
    q = np.stack([lo, hi], axis=-1).reshape(n, k_blocks, half * 2).astype(np.float32) - 8.0
    w = (q * scales[:, :, None]).reshape(n, -1)[:, :k]
    return w.T.copy()
