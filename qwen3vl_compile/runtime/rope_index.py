"""Interleaved-MRoPE position ids in numpy, equal to Hugging Face's
``Qwen3VLModel.get_rope_index`` (REFERENCE section 3).

Text tokens get consecutive positions on all three axes. An image's ``h/m x w/m`` merged
tokens get T = start, H = start + row, W = start + col; the next text position is
``start + max(h, w) / m``. ``rope_delta = max(position) + 1 - length``; while decoding all
three axes are ``cache_position + rope_delta``.
"""

from __future__ import annotations

import numpy as np


def get_rope_index(
    input_ids: np.ndarray,
    image_grid_thw=None,
    video_grid_thw=None,
    *,
    image_token_id: int = 151655,
    video_token_id: int = 151656,
    spatial_merge_size: int = 2,
    attention_mask: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``input_ids [B, S]`` -> ``position_ids [3, B, S]`` int64 and ``rope_deltas [B, 1]``."""
    input_ids = np.asarray(input_ids)
    batch, seq = input_ids.shape
    images = [tuple(int(v) for v in g) for g in (image_grid_thw if image_grid_thw is not None else [])]
    videos = []
    for g in video_grid_thw if video_grid_thw is not None else []:
        t, h, w = (int(v) for v in g)
        videos += [(1, h, w)] * t  # Qwen3-VL separates video frames with timestamps
    grids = {1: iter(images), 2: iter(videos)}
    positions = np.zeros((3, batch, seq), dtype=np.int64)
    deltas = np.zeros((batch, 1), dtype=np.int64)
    for b in range(batch):
        keep = np.ones(seq, bool) if attention_mask is None else np.asarray(attention_mask[b]).astype(bool)
        ids = input_ids[b][keep]
        kind = np.where(ids == image_token_id, 1, np.where(ids == video_token_id, 2, 0))
        pieces, current = [], 0
        for modality, start, end in _runs(kind):
            if modality == 0:
                n = end - start
                pieces.append(np.broadcast_to(np.arange(n) + current, (3, n)))
                current += n
            else:
                _, h, w = next(grids[modality])
                gh, gw = h // spatial_merge_size, w // spatial_merge_size
                rows, cols = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
                pieces.append(np.stack([np.full(gh * gw, current), rows.reshape(-1) + current, cols.reshape(-1) + current]))
                current += max(h, w) // spatial_merge_size
        pos = np.concatenate(pieces, axis=1) if pieces else np.zeros((3, 0), np.int64)
        positions[:, b, keep] = pos
        deltas[b, 0] = (pos.max() + 1 - len(ids)) if pos.size else 0
    return positions, deltas


def _runs(kind: np.ndarray):
    """(value, start, end) of each run of equal values."""
    if kind.size == 0:
        return []
    edges = np.flatnonzero(np.diff(kind)) + 1
    starts = np.concatenate([[0], edges])
    ends = np.concatenate([edges, [kind.size]])
    return [(int(kind[s]), int(s), int(e)) for s, e in zip(starts, ends)]


def decode_positions(cache_position: int, rope_deltas: np.ndarray, length: int = 1) -> np.ndarray:
    """Positions ``[3, B, length]`` for tokens appended at ``cache_position``."""
    base = np.arange(cache_position, cache_position + length, dtype=np.int64)[None, None, :]
    return np.broadcast_to(base + rope_deltas[None, :, :], (3, rope_deltas.shape[0], length)).copy()
