"""numpy MRoPE positions against Hugging Face: ``Qwen3VLModel.get_rope_index`` for the
prompt, and the positions ``generate`` actually feeds the text model for decode steps."""

import numpy as np
import pytest
import torch

from qwen3vl_compile.errors import RuntimeInputError
from qwen3vl_compile.runtime.rope_index import decode_positions, get_rope_index, mm_token_types

PAD, VIDEO_PAD, VS, VE, EOT = 151655, 151656, 151652, 151653, 151643
IDS = dict(image_token_id=PAD, video_token_id=VIDEO_PAD, spatial_merge_size=2)


@pytest.fixture(scope="module")
def hf_model(tiny_checkpoint):
    return tiny_checkpoint.load_full_model().eval()


def _ids(grids, seed=0, lead=4, tail=True):
    """Text, then per image ``<vision_start> pads <vision_end>`` and some text."""
    rng = np.random.default_rng(seed)
    parts = [rng.integers(0, 1000, lead)]
    for i, (t, h, w) in enumerate(grids):
        parts += [[VS], np.full(t * h * w // 4, PAD), [VE]]
        if tail or i < len(grids) - 1:
            parts.append(rng.integers(0, 1000, int(rng.integers(1, 6))))
    return np.concatenate(parts).astype(np.int64)[None]


def _hf_index(model, ids, image_grids=None, video_grids=None, mask=None):
    types = mm_token_types(ids, image_token_id=PAD, video_token_id=VIDEO_PAD)
    kwargs = {"mm_token_type_ids": torch.from_numpy(types)}
    if image_grids:
        kwargs["image_grid_thw"] = torch.tensor(image_grids)
    if video_grids:
        kwargs["video_grid_thw"] = torch.tensor(video_grids)
    if mask is not None:
        kwargs["attention_mask"] = torch.from_numpy(mask)
    pos, delta = model.model.get_rope_index(torch.from_numpy(ids), **kwargs)
    return pos.numpy(), delta.numpy()


@pytest.mark.parametrize(
    "grids",
    [
        [],
        [(1, 16, 16)],
        [(1, 28, 28), (1, 8, 12)],
        [(1, 8, 12), (1, 28, 28)],  # same images, other order
        [(1, 6, 10), (1, 16, 16), (1, 12, 4)],  # includes tall and wide grids
    ],
)
def test_equal_to_hugging_face(hf_model, grids):
    ids = _ids(grids)
    ours, delta = get_rope_index(ids, grids or None, **IDS)
    ref, ref_delta = _hf_index(hf_model, ids, grids)
    assert ours.dtype == np.int64 and ours.shape == (3, 1, ids.shape[1]) and delta.shape == (1, 1)
    np.testing.assert_array_equal(ours, ref)
    np.testing.assert_array_equal(delta, ref_delta)
    if grids:
        assert delta[0, 0] < 0  # images take fewer positions than tokens


def test_image_at_both_ends_and_adjacent_images(hf_model):
    """Pads first and last in the sequence; two images with no token between them (one run
    of pads, split by the grids)."""
    ids = np.concatenate([np.full(12, PAD), [1, 2, 3], np.full(16, PAD)])[None].astype(np.int64)
    ours, delta = get_rope_index(ids, [(1, 4, 12), (1, 8, 8)], **IDS)
    ref, ref_delta = _hf_index(hf_model, ids, [(1, 4, 12), (1, 8, 8)])
    np.testing.assert_array_equal(ours, ref)
    np.testing.assert_array_equal(delta, ref_delta)
    adjacent = np.concatenate([[5], np.full(12, PAD), np.full(16, PAD), [6]])[None].astype(np.int64)
    pos, _ = get_rope_index(adjacent, [(1, 4, 12), (1, 8, 8)], **IDS)
    separate = np.concatenate([[5], np.full(12, PAD), [0], np.full(16, PAD), [6]])[None].astype(np.int64)
    sep_pos, _ = get_rope_index(separate, [(1, 4, 12), (1, 8, 8)], **IDS)
    np.testing.assert_array_equal(pos[:, :, 13:], sep_pos[:, :, 14:] - 1)  # the same, one text token less


def test_video_frames_split_like_hf(hf_model):
    """A 2-frame video: Qwen3-VL puts a timestamp before each frame; each frame is its own grid."""
    rng = np.random.default_rng(5)
    frame = lambda: [VS, *[VIDEO_PAD] * 16, VE]  # noqa: E731
    ids = np.array([1, 2, *rng.integers(0, 900, 3), *frame(), 7, 8, *frame(), *np.full(9, PAD), 4, 5], np.int64)[None]
    ours, delta = get_rope_index(ids, [(1, 6, 6)], [(2, 8, 8)], **IDS)
    ref, ref_delta = _hf_index(hf_model, ids, [(1, 6, 6)], [(2, 8, 8)])
    np.testing.assert_array_equal(ours, ref)
    np.testing.assert_array_equal(delta, ref_delta)


def test_left_padded_batch_matches_hf(hf_model):
    a, b = _ids([(1, 8, 8), (1, 4, 6)], seed=1), _ids([(1, 12, 8)], seed=2)
    width = max(a.shape[1], b.shape[1]) + 2
    ids = np.full((2, width), EOT, np.int64)
    mask = np.zeros((2, width), np.int64)
    for row, seq in enumerate((a[0], b[0])):
        ids[row, width - len(seq):] = seq
        mask[row, width - len(seq):] = 1
    grids = [(1, 8, 8), (1, 4, 6), (1, 12, 8)]
    ours, delta = get_rope_index(ids, grids, attention_mask=mask, **IDS)
    ref, ref_delta = _hf_index(hf_model, ids, grids, mask=mask)
    np.testing.assert_array_equal(ours, ref)
    np.testing.assert_array_equal(delta, ref_delta)


def test_grid_count_mismatch_is_an_error():
    ids = _ids([(1, 8, 8), (1, 4, 4)])
    with pytest.raises(RuntimeInputError, match="more image pads"):
        get_rope_index(ids, [(1, 8, 8)], **IDS)
    with pytest.raises(RuntimeInputError, match="3 image grids given but the prompt holds 2"):
        get_rope_index(ids, [(1, 8, 8), (1, 4, 4), (1, 4, 4)], **IDS)
    with pytest.raises(RuntimeInputError, match="needs 16 pad tokens"):
        get_rope_index(ids, [(1, 8, 8), (1, 8, 8)], **IDS)


def _generate_positions(model, ids, grids, mask, steps):
    """Run Hugging Face's generate and record the MRoPE rows of the position ids it feeds
    the text model at each forward (prefill first)."""
    seen = []

    def hook(_module, _args, kwargs):
        seen.append(kwargs["position_ids"][1:].numpy().copy())  # row 0 is the text position

    n_patches = sum(t * h * w for t, h, w in grids)
    handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model.generate(
                input_ids=torch.from_numpy(ids),
                attention_mask=torch.from_numpy(mask),
                mm_token_type_ids=torch.from_numpy(mm_token_types(ids, image_token_id=PAD, video_token_id=VIDEO_PAD)),
                pixel_values=torch.randn(n_patches, 1536, generator=torch.Generator().manual_seed(0)),
                image_grid_thw=torch.tensor(grids),
                max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=EOT,
            )
    finally:
        handle.remove()
    assert len(seen) == steps
    return seen


def test_decode_positions_follow_hf_generate(hf_model):
    grids = [(1, 28, 28), (1, 6, 10)]
    ids = _ids(grids, seed=3)
    seen = _generate_positions(hf_model, ids, grids, np.ones_like(ids), steps=4)
    prompt_pos, delta = get_rope_index(ids, grids, **IDS)
    np.testing.assert_array_equal(seen[0], prompt_pos)
    for k, step in enumerate(seen[1:]):
        np.testing.assert_array_equal(decode_positions(ids.shape[1] + k, delta), step)
    assert decode_positions(ids.shape[1], delta, length=3).tolist()[0][0] == [ids.shape[1] + delta[0, 0] + j for j in range(3)]


def test_decode_positions_left_padded_batch_follow_hf_generate(hf_model):
    a, b = _ids([(1, 8, 8)], seed=4), _ids([(1, 16, 12), (1, 4, 4)], seed=6)
    width = max(a.shape[1], b.shape[1]) + 3
    ids = np.full((2, width), EOT, np.int64)
    mask = np.zeros((2, width), np.int64)
    for row, seq in enumerate((a[0], b[0])):
        ids[row, width - len(seq):] = seq
        mask[row, width - len(seq):] = 1
    grids = [(1, 8, 8), (1, 16, 12), (1, 4, 4)]
    seen = _generate_positions(hf_model, ids, grids, mask, steps=3)
    prompt_pos, delta = get_rope_index(ids, grids, attention_mask=mask, **IDS)
    np.testing.assert_array_equal(seen[0], prompt_pos)
    for k, step in enumerate(seen[1:]):
        full_mask = np.concatenate([mask, np.ones((2, k + 1), np.int64)], axis=1)
        np.testing.assert_array_equal(decode_positions(width + k, delta, attention_mask=full_mask), step)
    # Without the mask the padded row would be off by its padding: the mask matters here.
    assert not np.array_equal(decode_positions(width, delta), seen[1])
