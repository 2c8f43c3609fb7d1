"""Interleaved-MRoPE position ids in numpy, equal to Hugging Face's
``Qwen3VLModel.get_rope_index`` (tested against it), and the positions of decode steps.

Tokens are grouped into runs by modality (``mm_token_type_ids``: 0 text, 1 image pad,
2 video pad). A text run of n tokens gets ``current + 0..n-1`` on all three axes. An image
(or one video frame) of grid ``(t, h, w)`` gets, per merged token, T = ``current + frame``,
H = ``current + row``, W = ``current + col`` (``h/m x w/m`` merged tokens per frame); the next
position is ``current + max(h, w) / m``. Videos are split into single frames first, because
Qwen3-VL writes a ``<t seconds>`` timestamp before each frame.

``rope_delta = max(position) + 1 - number_of_tokens``: the image compresses positions, so
after the prompt all three axes continue at ``real_tokens_so_far + rope_delta``.
"""

from __future__ import annotations

import numpy as np

from ..errors import RuntimeInputError

TEXT, IMAGE, VIDEO = 0, 1, 2


def mm_token_types(input_ids: np.ndarray, *, image_token_id: int, video_token_id: int) -> np.ndarray:
    """``mm_token_type_ids`` as Qwen3VLProcessor returns them: 1 on image pads, 2 on video
    pads, 0 elsewhere (int64, the shape of ``input_ids``)."""
    ids = np.asarray(input_ids)
    return np.where(ids == image_token_id, IMAGE, np.where(ids == video_token_id, VIDEO, TEXT)).astype(np.int64)


def get_rope_index(
    input_ids: np.ndarray,
    image_grid_thw=None,
    video_grid_thw=None,
    *,
    image_token_id: int,
    video_token_id: int,
    spatial_merge_size: int,
    mm_token_type_ids: np.ndarray | None = None,
    attention_mask: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``input_ids [B, S]`` -> ``position_ids [3, B, S]`` int64 and ``rope_deltas [B, 1]`` int64.

    Grids are consumed in order across the batch, as in Hugging Face. ``mm_token_type_ids``
    defaults to :func:`mm_token_types` of ``input_ids``. With an ``attention_mask`` (left
    padding), padded positions get 0 and the delta counts only the real tokens.
    """
    input_ids = np.asarray(input_ids)
    if input_ids.ndim != 2:
        raise RuntimeInputError(f"input_ids must be [batch, seq], got shape {input_ids.shape}")
    if mm_token_type_ids is None:
        mm_token_type_ids = mm_token_types(input_ids, image_token_id=image_token_id, video_token_id=video_token_id)
    types = np.asarray(mm_token_type_ids)
    grids = {IMAGE: _grid_list(image_grid_thw), VIDEO: _video_frames(_grid_list(video_grid_thw))}
    cursor = {IMAGE: 0, VIDEO: 0}
    batch, seq = input_ids.shape
    positions = np.zeros((3, batch, seq), dtype=np.int64)
    deltas = np.zeros((batch, 1), dtype=np.int64)
    for b in range(batch):
        keep = np.ones(seq, bool) if attention_mask is None else np.asarray(attention_mask[b]).astype(bool)
        pos = _sequence_positions(types[b][keep], grids, cursor, spatial_merge_size)
        positions[:, b, keep] = pos
        deltas[b, 0] = pos.max() + 1 - pos.shape[1] if pos.size else 0
    for kind, name in ((IMAGE, "image"), (VIDEO, "video frame")):
        if cursor[kind] != len(grids[kind]):
            raise RuntimeInputError(f"{len(grids[kind])} {name} grids given but the prompt holds {cursor[kind]} {name}s")
    return positions, deltas


def _grid_list(grid_thw) -> list[tuple[int, int, int]]:
    if grid_thw is None:
        return []
    return [tuple(int(v) for v in g) for g in np.asarray(grid_thw).reshape(-1, 3)]


def _video_frames(grids: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Each video ``(t, h, w)`` becomes t single frames ``(1, h, w)`` (timestamps separate them)."""
    return [(1, h, w) for t, h, w in grids for _ in range(t)]


def _sequence_positions(types: np.ndarray, grids: dict, cursor: dict, merge: int) -> np.ndarray:
    """Positions ``[3, n]`` of one unpadded sequence; advances ``cursor`` over the grids used."""
    pieces, current = [], 0
    for kind, start, end in _runs(types):
        if kind == TEXT:
            n = end - start
            pieces.append(np.broadcast_to(np.arange(current, current + n, dtype=np.int64), (3, n)))
            current += n
            continue
        left = end - start
        while left > 0:  # adjacent items of one modality form a single run: split it by grids
            if cursor[kind] >= len(grids[kind]):
                name = "image" if kind == IMAGE else "video"
                raise RuntimeInputError(f"the prompt holds more {name} pads than the grids given cover")
            t, h, w = grids[kind][cursor[kind]]
            cursor[kind] += 1
            block = vision_positions(current, (t, h, w), merge)
            if block.shape[1] > left:
                raise RuntimeInputError(
                    f"grid {(t, h, w)} needs {block.shape[1]} pad tokens but the prompt has {left} left in this run"
                )
            pieces.append(block)
            left -= block.shape[1]
            current += max(h, w) // merge
    return np.concatenate(pieces, axis=1) if pieces else np.zeros((3, 0), np.int64)


def vision_positions(start: int, grid_thw, spatial_merge_size: int) -> np.ndarray:
    """``[3, t*(h/m)*(w/m)]`` positions of one image: T = start + frame, H = start + row,
    W = start + col, rows of merged tokens in row-major order (Hugging Face's
    ``get_vision_position_ids`` with ``temp_merge_size=1``, ``time_interval=1``)."""
    t, h, w = (int(v) for v in grid_thw)
    gh, gw = h // spatial_merge_size, w // spatial_merge_size
    tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
    return np.stack([tt.reshape(-1), hh.reshape(-1), ww.reshape(-1)]).astype(np.int64) + start


def _runs(kind: np.ndarray) -> list[tuple[int, int, int]]:
    """``(value, start, end)`` of each run of equal values (``itertools.groupby`` order)."""
    if kind.size == 0:
        return []
    edges = np.flatnonzero(np.diff(kind)) + 1
    starts = np.concatenate([[0], edges])
    ends = np.concatenate([edges, [kind.size]])
    return [(int(kind[s]), int(s), int(e)) for s, e in zip(starts, ends)]


def decode_positions(
    cache_position: int, rope_deltas: np.ndarray, length: int = 1, *, attention_mask: np.ndarray | None = None
) -> np.ndarray:
    """Positions ``[3, B, length]`` (int64) of ``length`` tokens appended after
    ``cache_position`` cached ones: all three axes = text position + ``rope_delta``.

    Without a mask the text position is ``cache_position + j``. With ``attention_mask``
    ``[B, cache_position + length]`` (left padding) it counts real tokens only,
    ``cumsum(mask) - 1``, which is where Hugging Face's generate continues: one past the
    largest prompt position.
    """
    deltas = np.asarray(rope_deltas, dtype=np.int64).reshape(-1, 1)
    if attention_mask is None:
        text = np.arange(cache_position, cache_position + length, dtype=np.int64)[None, :]
    else:
        mask = np.asarray(attention_mask, dtype=np.int64)
        if mask.shape != (deltas.shape[0], cache_position + length):
            raise RuntimeInputError(
                f"attention_mask shape {mask.shape}, expected {(deltas.shape[0], cache_position + length)} (past + new tokens)"
            )
        text = (np.cumsum(mask, axis=-1) - 1)[:, cache_position:]
    return np.broadcast_to(text + deltas, (3, deltas.shape[0], length)).copy()
