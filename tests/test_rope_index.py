"""numpy MRoPE positions against Hugging Face's get_rope_index."""

import numpy as np
import pytest
import torch

from qwen3vl_compile.runtime.rope_index import decode_positions, get_rope_index

PAD, VS, VE = 151655, 151652, 151653


@pytest.fixture(scope="module")
def hf_model(tiny_checkpoint):
    return tiny_checkpoint.load_full_model().model


def _ids(grids, seed=0):
    rng = np.random.default_rng(seed)
    parts = [rng.integers(0, 1000, 4)]
    for _, h, w in grids:
        parts += [[VS], np.full(h * w // 4, PAD), [VE], rng.integers(0, 1000, int(rng.integers(1, 6)))]
    return np.concatenate(parts).astype(np.int64)[None]


@pytest.mark.parametrize(
    "grids",
    [[], [(1, 16, 16)], [(1, 28, 28), (1, 8, 12)], [(1, 6, 10), (1, 16, 16), (1, 12, 4)]],
)
def test_equal_to_hugging_face(hf_model, grids):
    ids = _ids(grids)
    ours, delta = get_rope_index(ids, grids or None)
    if grids:
        ref, ref_delta = hf_model.get_rope_index(
            torch.from_numpy(ids), mm_token_type_ids=torch.from_numpy((ids == PAD).astype(np.int32)), image_grid_thw=torch.tensor(grids)
        )
        np.testing.assert_array_equal(ours, ref.numpy())
        np.testing.assert_array_equal(delta, ref_delta.numpy())
    else:
        np.testing.assert_array_equal(ours, np.broadcast_to(np.arange(ids.shape[1]), (3, 1, ids.shape[1])))
        assert delta.tolist() == [[0]]


def test_left_padding_matches_hf(hf_model):
    ids = _ids([(1, 8, 8)])
    padded = np.concatenate([np.zeros((1, 3), np.int64), ids], axis=1)
    mask = np.concatenate([np.zeros((1, 3), np.int64), np.ones_like(ids)], axis=1)
    ours, delta = get_rope_index(padded, [(1, 8, 8)], attention_mask=mask)
    ref, ref_delta = hf_model.get_rope_index(
        torch.from_numpy(padded), mm_token_type_ids=torch.from_numpy((padded == PAD).astype(np.int32)),
        image_grid_thw=torch.tensor([(1, 8, 8)]), attention_mask=torch.from_numpy(mask),
    )
    np.testing.assert_array_equal(ours, ref.numpy())
    np.testing.assert_array_equal(delta, ref_delta.numpy())


def test_decode_positions_follow_rope_delta(hf_model):
    ids = _ids([(1, 28, 28)])
    _, delta = get_rope_index(ids, [(1, 28, 28)])
    assert delta[0, 0] < 0  # the image is shorter in positions than in tokens
    pos = decode_positions(ids.shape[1], delta)
    assert pos.shape == (3, 1, 1) and (pos == ids.shape[1] + delta[0, 0]).all()
