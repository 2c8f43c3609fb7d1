"""Weight-only INT4 block quantization for MatMulNBits, with ONNX Runtime's own C++ routine
(the one its MatMulNBitsQuantizer uses), one tensor at a time.

Symmetric: no zero points (MatMulNBits then uses 8), scales fp32 per block of ``block_size``
input elements.
"""

from __future__ import annotations

import numpy as np


# Columns quantized per call: each call needs a contiguous fp32 copy of its [K, columns]
# slice, so a chunk bounds that copy (64 MiB at K = 2560) instead of duplicating the whole
# matrix (1.5 GB for a 152k-vocabulary lm_head).
CHUNK_ELEMENTS = 16 << 20


def quantize_int4(weight_kn: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``weight_kn``: fp32 [K, N] (ONNX MatMul's B; a transposed view is fine). Returns packed
    uint8 [N, K/bs, bs/2] and scales fp32 [N, K/bs].

    Blocks run along K within one output column, so columns are independent: quantizing
    them in chunks gives the same bytes as one call."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    k, n = weight_kn.shape
    k_blocks = (k + block_size - 1) // block_size
    packed = np.zeros((n, k_blocks, block_size // 2), dtype=np.uint8)
    scales = np.zeros((n, k_blocks), dtype=np.float32)
    step = max(1, CHUNK_ELEMENTS // max(k, 1))
    for n0 in range(0, n, step):
        n1 = min(n, n0 + step)
        w = np.ascontiguousarray(weight_kn[:, n0:n1], dtype=np.float32)
        if k_blocks * block_size != k:
            w = np.pad(w, ((0, k_blocks * block_size - k), (0, 0)))
        p, sc = packed[n0:n1], scales[n0:n1]  # views: filled in place
        zero_points = np.zeros((n1 - n0, (k_blocks + 1) // 2), dtype=np.uint8)  # unused (symmetric)
        quantize_matmul_4bits(p, w, sc, zero_points, block_size, n1 - n0, k, True)
    return packed, scales


def dequantize_int4(packed: np.ndarray, scales: np.ndarray, k: int) -> np.ndarray:
    """Inverse, for tests: fp32 [K, N]."""
    n, k_blocks, half = packed.shape
    lo = (packed & 0x0F).astype(np.int8)
    hi = (packed >> 4).astype(np.int8)
    q = np.stack([lo, hi], axis=-1).reshape(n, k_blocks, half * 2).astype(np.float32) - 8.0
    w = (q * scales[:, :, None]).reshape(n, -1)[:, :k]
    return w.T.copy()
