"""decoder.onnx against Hugging Face: fp32 parity through the KV-cache runtime path, and
proof that the check sees a dropped DeepStack or shifted MRoPE positions."""

import numpy as np
import pytest
import torch

from qwen3vl_compile.errors import UsageError
from qwen3vl_compile.export.decoder_verify import verify_decoder
from qwen3vl_compile.export.text_decoder import build_decoder_model, save_streaming
from qwen3vl_compile.passes import decoder_passes
from qwen3vl_compile.passes.base import run_passes
from qwen3vl_compile.runtime.decoder_session import DecoderSession

from planted import swap_mrope_streams


def _build(ck, path, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    model, spec = build_decoder_model(ck, context_length=512, **kw)
    model, reports = run_passes(model, decoder_passes(spec))
    save_streaming(model, path)
    return spec, reports


@pytest.fixture(scope="module")
def fp32_decoder(tiny_checkpoint, tmp_path_factory):
    path = tmp_path_factory.mktemp("dec") / "decoder.onnx"
    spec, reports = _build(tiny_checkpoint, path, precision="fp32", logits="all")
    assert reports[0].stats == {"levels": 3, "adds_inserted": 3, "layers": 4}
    return path, spec


@pytest.fixture(scope="module")
def hf(tiny_checkpoint):
    return tiny_checkpoint.load_full_model()


def test_fp32_parity_text_and_image_with_kv_cache(fp32_decoder, tiny_checkpoint):
    parity = verify_decoder(fp32_decoder[0], tiny_checkpoint, "fp32")
    assert set(parity.cases) == {"text_only", "image", "two_images"}
    assert parity.passed, parity.failures()
    worst = max(o.max_rel for outs in parity.cases.values() for o in outs)
    assert worst < 1e-5  # measured ~1.9e-6; the gate is 1e-4
    j = parity.to_json()
    assert (j["layers_checked"], j["layers"], j["reference_dtype"]) == (4, 4, "float32")


def _image_prompt(hf, grids, seed=0):
    """Embeddings, positions, DeepStack for a prompt with images of the given grids."""
    g = torch.Generator().manual_seed(seed)
    parts = [torch.randint(0, 3000, (4,), generator=g)]
    for _, h, w in grids:
        parts += [torch.tensor([151652]), torch.full((h * w // 4,), 151655), torch.tensor([151653]), torch.randint(0, 3000, (3,), generator=g)]
    ids = torch.cat(parts)[None]
    mask = ids == 151655
    with torch.no_grad():
        embeds = hf.model.language_model.embed_tokens(ids).clone()
    embeds[mask] = torch.randn(int(mask.sum()), 128, generator=g)
    deep = [torch.randn(int(mask.sum()), 128, generator=g) for _ in range(3)]
    pos, _ = hf.model.get_rope_index(ids, mm_token_type_ids=mask.int(), image_grid_thw=torch.tensor(grids))
    return ids, mask, embeds, deep, pos


def _hf_logits(hf, ids, mask, embeds, deep, pos, use_deepstack=True):
    with torch.no_grad():
        out = hf.model.language_model(
            inputs_embeds=embeds, position_ids=pos, attention_mask=torch.ones_like(ids),
            visual_pos_masks=mask if use_deepstack else None, deepstack_visual_embeds=deep if use_deepstack else None,
        )
        return hf.lm_head(out.last_hidden_state).numpy()


def _ours(path, mask, embeds, deep, pos):
    d = np.zeros((3, *embeds.shape), np.float32)
    for k in range(3):
        d[k][mask.numpy()] = deep[k].numpy()
    return DecoderSession(path, max_length=512).run(embeds.numpy(), pos.numpy(), d)


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_two_images_of_different_sizes_all_positions(fp32_decoder, hf):
    ids, mask, embeds, deep, pos = _image_prompt(hf, [(1, 8, 8), (1, 6, 10)])
    ref = _hf_logits(hf, ids, mask, embeds, deep, pos)
    got = _ours(fp32_decoder[0], mask, embeds, deep, pos)
    assert got.shape == ref.shape and _rel(got, ref) <= 1e-4
    assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_check_sees_missing_deepstack(fp32_decoder, hf):
    ids, mask, embeds, deep, pos = _image_prompt(hf, [(1, 8, 8)])
    without = _hf_logits(hf, ids, mask, embeds, deep, pos, use_deepstack=False)
    ours = _ours(fp32_decoder[0], mask, embeds, deep, pos)
    assert _rel(ours, without) > 1e-2  # a decoder without DeepStack would fail the 1e-4 gate


def test_check_sees_shifted_mrope(fp32_decoder, hf):
    ids, mask, embeds, deep, pos = _image_prompt(hf, [(1, 8, 8)])
    ref = _hf_logits(hf, ids, mask, embeds, deep, pos)
    flat = torch.arange(ids.shape[1]).view(1, 1, -1).expand(3, 1, -1)  # 1D positions: MRoPE ignored
    assert _rel(_ours(fp32_decoder[0], mask, embeds, deep, flat), ref) > 1e-2
    # A uniform shift is invisible to rotary attention (relative positions); swapping the
    # height and width streams (a wrong interleave) is not.
    swapped = pos[[0, 2, 1]]
    assert _rel(_ours(fp32_decoder[0], mask, embeds, deep, swapped), ref) > 1e-3


def test_int4_is_gated_against_the_dequantized_oracle(tiny_checkpoint, tmp_path):
    """INT4 (accuracy_level 4, the default) is gated twice: at fp32 activations against
    Hugging Face with the same quantize-dequantized weights (exact: 1e-4), and at its own
    level with the measured int8-activation tolerance; the distance to the unquantized model
    is reported beside."""
    path = tmp_path / "decoder.onnx"
    _build(tiny_checkpoint, path, precision="int4", logits="last")
    parity = verify_decoder(path, tiny_checkpoint, "int4")
    assert parity.passed, parity.failures()
    assert not list(tmp_path.glob("*accuracy0*"))  # the level-0 twin is removed
    for outs in parity.cases.values():
        exact, level4, unrounded = outs
        assert (exact.name, level4.name, unrounded.name) == ("logits", "logits_at_accuracy_level_4", "logits_vs_unrounded_fp32")
        assert exact.max_rel < 1e-5 and exact.tolerance == 1e-4
        assert 1e-3 < level4.max_rel < level4.tolerance  # int8 activations: visible, within the gate
        assert unrounded.max_rel > 0.1 and not np.isfinite(unrounded.tolerance)  # quantization cost, reported
    assert parity.golden_tolerance == level4.tolerance


@pytest.mark.parametrize("precision", ["int4", "fp16"])
def test_reduced_precision_gate_sees_planted_bugs(tiny_checkpoint, tmp_path, precision):
    """A decoder without DeepStack (the public recipe) or with the H and W MRoPE streams
    swapped fails the default-precision gate."""
    ok = tmp_path / "ok" / "decoder.onnx"
    _build(tiny_checkpoint, ok, precision=precision, logits="last")
    assert verify_decoder(ok, tiny_checkpoint, precision).passed
    no_deepstack = tmp_path / "nods" / "decoder.onnx"
    model, spec = build_decoder_model(tiny_checkpoint, context_length=512, precision=precision, logits="last")
    no_deepstack.parent.mkdir()
    save_streaming(model, no_deepstack)  # no InsertDeepStackPass
    swapped = tmp_path / "swap" / "decoder.onnx"
    model, spec = build_decoder_model(tiny_checkpoint, context_length=512, precision=precision, logits="last")
    model, _ = run_passes(model, decoder_passes(spec))
    swapped.parent.mkdir()
    save_streaming(swap_mrope_streams(model), swapped)
    for bad in (no_deepstack, swapped):
        parity = verify_decoder(bad, tiny_checkpoint, precision)
        assert not parity.passed, bad
        assert all(o.passed for o in parity.cases["text_only"]) or bad == swapped  # text-only does not use DeepStack
        worst_image = max(o.max_rel for o in parity.cases["image"] if o.name == "logits")
        assert worst_image > 10 * 1e-4, (bad, worst_image)


def test_int4_kernel_matches_dequantized_weights(tiny_checkpoint, hf, tmp_path):
    """accuracy_level 0 computes in fp32: equal to the model with dequantized weights."""
    from qwen3vl_compile.export.quantize import dequantize_int4, quantize_int4

    path = tmp_path / "decoder.onnx"
    _build(tiny_checkpoint, path, precision="int4", accuracy_level=0, logits="all")
    import copy

    model = copy.deepcopy(hf)
    with torch.no_grad():
        for mod in [m for m in model.model.language_model.modules() if isinstance(m, torch.nn.Linear)]:
            w = mod.weight.numpy()
            p, s = quantize_int4(w.T.copy(), 32)
            mod.weight.copy_(torch.from_numpy(dequantize_int4(p, s, w.shape[1]).T.copy()))
        w = model.lm_head.weight.detach().numpy().copy()
        p, s = quantize_int4(w.T.copy(), 32)
        model.lm_head.weight = torch.nn.Parameter(torch.from_numpy(dequantize_int4(p, s, w.shape[1]).T.copy()))
    ids, mask, embeds, deep, pos = _image_prompt(model, [(1, 8, 8)])
    ref = _hf_logits(model, ids, mask, embeds, deep, pos)
    assert _rel(_ours(path, mask, embeds, deep, pos), ref) < 1e-4


def test_context_overflow_is_refused(fp32_decoder):
    from qwen3vl_compile.errors import RuntimeInputError

    s = DecoderSession(fp32_decoder[0], max_length=8)
    with pytest.raises(RuntimeInputError, match="exceeds the context of 8"):
        s.run(np.zeros((1, 9, 128), np.float32), np.zeros((3, 1, 9), np.int64))


def test_unknown_precision_refused(tiny_checkpoint):
    with pytest.raises(UsageError, match="int3"):
        build_decoder_model(tiny_checkpoint, precision="int3")
