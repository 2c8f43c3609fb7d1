"""Patched eager equals unpatched eager; patches are restored in every case."""

import numpy as np
import pytest
import torch
from transformers.models.qwen3_vl import modeling_qwen3_vl as upstream

from qwen3vl_compile.errors import PatchError
from qwen3vl_compile.patches import Patch, apply_patches, vision_export_patches, vision_patches


def _targets():
    return {
        "rotary": upstream.Qwen3VLVisionRotaryEmbedding.__dict__["forward"],
        "attention": upstream.Qwen3VLVisionAttention.__dict__["forward"],
        "position_ids": upstream.get_vision_position_ids,
        "pos_embed": upstream.get_vision_interpolation_indices_and_weights,
        "seqlens": upstream.get_vision_attention_seqlens,
    }


def _run(visual, grids, seed=0):
    n = sum(t * h * w for t, h, w in grids)
    x = torch.from_numpy(np.random.default_rng(seed).uniform(-1, 1, (n, 1536)).astype(np.float32))
    with torch.no_grad():
        out = visual(x, grid_thw=torch.tensor(grids))
    return [out.pooler_output, *out.deepstack_features]


@pytest.mark.parametrize(
    "grids, tol",
    [
        ([(1, 14, 14)], 0.0),  # one segment: the patched call is exactly upstream's
        ([(1, 28, 28)], 0.0),
        ([(1, 8, 16)], 0.0),
        ([(1, 16, 16), (1, 12, 20)], 1e-6),  # two images: block-diagonal mask vs split
        ([(2, 8, 8)], 1e-6),  # two frames
    ],
)
def test_patched_eager_equals_unpatched(tiny_visual, grids, tol):
    ref = _run(tiny_visual, grids)
    with vision_export_patches(tiny_visual, grids):
        got = _run(tiny_visual, grids)
    for r, g in zip(ref, got):
        rel = (r - g).abs().max().item() / r.abs().max().item()
        assert rel <= tol, rel


def test_patches_change_something_measurable(tiny_visual):
    """Guard against a vacuous test: a patch specialised for another grid of the same size
    must refuse to run (and would give different numbers if it ran)."""
    with vision_export_patches(tiny_visual, [(1, 8, 32)]):
        with pytest.raises(PatchError, match="patched for grids"):
            _run(tiny_visual, [(1, 16, 16)])


def test_patches_restored_after_exception(tiny_visual):
    before = _targets()
    with pytest.raises(RuntimeError, match="boom"):
        with vision_export_patches(tiny_visual, [(1, 14, 14)]):
            assert _targets()["attention"] is not before["attention"]
            raise RuntimeError("boom")
    after = _targets()
    assert all(after[k] is before[k] for k in before)


def test_rollback_when_applying_fails_halfway(tiny_visual):
    before = _targets()
    bad = Patch(upstream, "no_such_function_anywhere", None, reason="test")
    patches = vision_patches(tiny_visual, [(1, 14, 14)])
    with pytest.raises(PatchError, match="not found"):
        with apply_patches(patches[:2] + [bad] + patches[2:]):
            pass
    after = _targets()
    assert all(after[k] is before[k] for k in before)
    assert "no_such_function_anywhere" not in vars(upstream)


def test_patch_records_reason(tiny_visual):
    """Each patch carries the "why export fails without it" paragraph of the module that
    defines its replacement, and that module is about the attribute the patch replaces."""
    import inspect

    patches = vision_patches(tiny_visual, [(1, 14, 14)])
    for p in patches:
        doc = inspect.getmodule(p.replacement).__doc__
        assert p.reason.startswith("Why export fails without it:") and p.reason in doc, p.name
        assert f".{p.attribute}``" in doc.splitlines()[0], (p.name, doc.splitlines()[0])
    assert len({p.reason for p in patches}) == len(patches)


def test_a_patch_refuses_an_upstream_version_it_was_not_written_for(tiny_visual):
    import dataclasses

    from qwen3vl_compile.errors import PatchError
    from qwen3vl_compile.patches import vision_dynamic_patches
    from qwen3vl_compile.patches.base import apply_patches

    patch = dataclasses.replace(vision_dynamic_patches()[0], versions="transformers<5.0 (made up)")
    before = type(tiny_visual).__dict__["forward"]
    with pytest.raises(PatchError, match=r"written for transformers<5.0 \(made up\), found transformers 5\."):
        with apply_patches([patch]):
            pass
    assert type(tiny_visual).__dict__["forward"] is before


@pytest.mark.parametrize("grids", [[(1, 16, 16), (1, 12, 20)], [(2, 8, 8)], [(1, 8, 12), (3, 4, 6), (1, 6, 6)]])
def test_one_block_diagonal_mask_for_bucket_and_any_size_graphs(tiny_visual, grids):
    """The bucket attention (segments from cu_seqlens) and the any-size forward (segments
    from each patch's frame start) build the same mask with the same builder."""
    from transformers import vision_utils

    from qwen3vl_compile.patches import vision_forward_dynamic
    from qwen3vl_compile.patches.vision_attention import block_diagonal_mask, segments_from_cu_seqlens

    g = torch.tensor(grids)
    n = int(g.prod(-1).sum())
    cu = vision_utils.get_vision_cu_seqlens(g)
    bucket = block_diagonal_mask(segments_from_cu_seqlens(cu, n), torch.float32)
    dynamic = vision_forward_dynamic.grid_kwargs(tiny_visual, n, g)["cu_seqlens"]
    assert bucket.shape == (1, 1, n, n) and torch.equal(bucket, dynamic)
    assert (bucket == 0).sum() == sum(t * (h * w) ** 2 for t, h, w in grids)


def test_attention_patch_mask_sources():
    from qwen3vl_compile.patches import vision_attention, vision_dynamic_patches

    assert {vision_attention.make_patch(m).name for m in vision_attention.MASK_SOURCES} == {"Qwen3VLVisionAttention.forward"}
    assert [p.name for p in vision_dynamic_patches(per_image=True)] == [p.name for p in vision_dynamic_patches()]
    with pytest.raises(PatchError, match="mask source 'segments' is not one of cu_seqlens, given, none"):
        vision_attention.make_patch("segments")
