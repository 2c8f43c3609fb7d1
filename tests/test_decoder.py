"""decoder.onnx against Hugging Face's Qwen3-VL end to end, the compile gate
(``verify_decoder``) at every precision, and proof that both see the bugs they exist for.

The reference is ``Qwen3VLForConditionalGeneration`` itself, fed ``input_ids`` and pixels
(it runs its vision tower, scatters the features, computes MRoPE positions and adds
DeepStack internally), with a ``DynamicCache`` for the decode steps. Our side gets the
inputs the runtime would give it, assembled from Hugging Face's own pieces:
``get_image_features`` (masked scatter onto the image pads; DeepStack levels at the same
rows, zero elsewhere) and ``get_rope_index``; decode positions are ``length + rope_delta``
on all three streams. The decoder runs through ``DecoderSession`` (shared in-place KV
buffers), prefill then greedy decode steps.

The tiny model has std-0.2 weights and randomised norms, so that a dropped DeepStack or a
wrong position changes logits by O(1) while genuine export error is ~1e-6 relative; the
negative tests prove the 1e-4 gate sees those bugs.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from qwen3vl_compile.errors import RuntimeInputError, UsageError
from qwen3vl_compile.export.decoder import build_decoder
from qwen3vl_compile.export.decoder_gate import verify_decoder
from qwen3vl_compile.export.text_decoder import build_decoder_model, save_streaming
from qwen3vl_compile.passes import decoder_passes
from qwen3vl_compile.passes.base import run_passes
from qwen3vl_compile.runtime.decoder_session import DecoderSession
from qwen3vl_compile.parity import TOLERANCES, measure

from planted import swap_mrope_streams

TOL = TOLERANCES[("decoder", "fp32")]  # relative: max|ours - ref| / max|ref|
IMAGE_PAD, VISION_START, VISION_END = 151655, 151652, 151653
PATCH_ROW = 3 * 2 * 16 * 16  # channels x temporal patch x patch x patch
DECODE_STEPS = 4
PROMPTS = {"text_only": [], "one_image": [(1, 8, 8)], "two_images": [(1, 8, 8), (1, 6, 10)]}


@dataclasses.dataclass
class Prompt:
    ids: torch.Tensor
    image_mask: torch.Tensor
    embeds: np.ndarray  # [1, S, H]
    deepstack: np.ndarray  # [K, 1, S, H], zero on text tokens
    positions: np.ndarray  # [3, 1, S]
    rope_delta: int
    ref_prefill: np.ndarray  # [1, S, V]
    step_tokens: list[int]
    step_embeds: list[np.ndarray]
    ref_steps: np.ndarray  # [1, DECODE_STEPS, V]

    def step_positions(self, t: int) -> np.ndarray:
        return np.full((3, 1, 1), self.ids.shape[1] + t + self.rope_delta, np.int64)


def _prompt(hf, grids, seed: int) -> Prompt:
    g = torch.Generator().manual_seed(seed)
    parts = [torch.randint(0, 5000, (5,), generator=g)]
    for _, h, w in grids:
        parts += [torch.tensor([VISION_START]), torch.full((h * w // 4,), IMAGE_PAD), torch.tensor([VISION_END])]
        parts.append(torch.randint(0, 5000, (3,), generator=g))
    parts.append(torch.randint(0, 5000, (4,), generator=g))
    ids = torch.cat(parts)[None]
    mask = ids == IMAGE_PAD
    mm_types = mask.int()
    grid = torch.tensor(grids) if grids else None
    pixels = torch.randn(sum(t * h * w for t, h, w in grids), PATCH_ROW, generator=g) if grids else None
    levels = len(hf.config.vision_config.deepstack_visual_indexes)

    with torch.no_grad():
        # Reference: the whole Hugging Face model, KV cache included.
        from transformers import DynamicCache

        hf.model.rope_deltas = None
        cache = DynamicCache(config=hf.config.text_config)
        kw = dict(pixel_values=pixels, image_grid_thw=grid, mm_token_type_ids=mm_types) if grids else {}
        out = hf(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=cache, use_cache=True, **kw)
        ref_prefill = out.logits.numpy()
        delta = int(hf.model.rope_deltas.item()) if grids else 0
        tokens, step_logits = [], []
        token = int(out.logits[0, -1].argmax())
        for t in range(DECODE_STEPS):
            length = ids.shape[1] + t
            pos = torch.full((3, 1, 1), length + delta)
            step = hf(input_ids=torch.tensor([[token]]), attention_mask=torch.ones(1, length + 1, dtype=torch.long),
                      position_ids=pos, past_key_values=cache, use_cache=True)
            tokens.append(token)
            step_logits.append(step.logits.numpy())
            token = int(step.logits[0, -1].argmax())

        # Our inputs, from Hugging Face's own pieces.
        embed = hf.model.get_input_embeddings()
        embeds = embed(ids).clone()
        deep = torch.zeros(levels, *embeds.shape)
        if grids:
            vis = hf.model.get_image_features(pixels, grid)
            embeds[mask] = torch.cat(vis.pooler_output)
            for k in range(levels):
                deep[k][mask] = torch.cat(vis.deepstack_features[k])
            positions, _ = hf.model.get_rope_index(ids, mm_token_type_ids=mm_types, image_grid_thw=grid)
        else:
            positions = torch.arange(ids.shape[1]).view(1, 1, -1).expand(3, 1, -1)
        step_embeds = [embed(torch.tensor([[tok]])).numpy() for tok in tokens]
    return Prompt(ids, mask, embeds.numpy(), deep.numpy(), positions.numpy().copy(), delta, ref_prefill, tokens, step_embeds,
                  np.concatenate(step_logits, 1))


def _run(session: DecoderSession, p: Prompt, *, deepstack=None, positions=None) -> tuple[np.ndarray, np.ndarray]:
    """Prefill then the reference's decode steps; (prefill logits, step logits)."""
    deep = p.deepstack if deepstack is None else deepstack
    prefill = session.prefill(p.embeds, p.positions if positions is None else positions, deep if session.has_deepstack else None)
    steps = [session.step(e, p.step_positions(t)) for t, e in enumerate(p.step_embeds)]
    return prefill, np.concatenate(steps, 1)


def _rel(actual, reference) -> float:
    return measure("logits", actual, reference, TOL).max_rel


@pytest.fixture(scope="module")
def hf(tiny_checkpoint):
    return tiny_checkpoint.load_full_model()


@pytest.fixture(scope="module")
def prompts(hf):
    return {name: _prompt(hf, grids, seed) for seed, (name, grids) in enumerate(PROMPTS.items())}


@pytest.fixture(scope="module")
def decoders(tiny_checkpoint, tmp_path_factory):
    """Built once per module, lazily: (precision, logits, deepstack) -> (path, report)."""
    root = tmp_path_factory.mktemp("decoders")
    cache = {}

    def get(precision="fp32", logits="all", deepstack=True):
        key = (precision, logits, deepstack)
        if key not in cache:
            path = root / "-".join(map(str, key)) / "decoder.onnx"
            cache[key] = (path, build_decoder(tiny_checkpoint, path, precision=precision, logits=logits,
                                              deepstack=deepstack, context_length=1024).to_json())
        return cache[key]

    return get


@pytest.fixture(scope="module")
def gate(decoders, tiny_checkpoint):
    """The compile's own gate (``verify_decoder``) on a built decoder, run once per
    (precision, logits): (path, parity)."""
    cache = {}

    def get(precision, logits="last"):
        if (precision, logits) not in cache:
            path = decoders(precision=precision, logits=logits)[0]
            cache[precision, logits] = (path, verify_decoder(path, tiny_checkpoint, precision))
        return cache[precision, logits]

    return get


@pytest.fixture(scope="module")
def fp32_session(decoders):
    return DecoderSession(decoders()[0], max_length=128, threads=2)


# ---- the build report and the graph's interface ------------------------------------------
def test_report_and_interface(decoders, tiny_checkpoint):
    path, report = decoders()
    t = tiny_checkpoint.text_config
    inputs = {i["name"]: i for i in report["inputs"]}
    assert list(inputs) == ["inputs_embeds", "attention_mask", "position_ids", "past_key_values.{i}.key",
                            "past_key_values.{i}.value", "deepstack_embeds"]
    assert inputs["position_ids"]["shape"] == [3, "batch_size", "sequence_length"]
    assert inputs["deepstack_embeds"]["shape"] == [3, "batch_size", "sequence_length", t["hidden_size"]]
    assert inputs["past_key_values.{i}.key"]["shape"] == ["batch_size", t["num_key_value_heads"], "past_sequence_length", t["head_dim"]]
    assert [o["name"] for o in report["outputs"]] == ["logits", "present.{i}.key", "present.{i}.value"]
    assert report["outputs"][0] == {"name": "logits", "dtype": "float32", "shape": ["batch_size", "sequence_length", t["vocab_size"]]}
    assert report["passes"][0]["pass"] == "InsertDeepStackPass"
    assert report["passes"][0]["stats"] == {"levels": 3, "adds_inserted": 3, "layers": 4}
    assert report["sizes"]["decoder.onnx.data"] > 0 and report["sizes"]["total"] == sum(
        p.stat().st_size for p in path.parent.iterdir())
    assert report["peak_rss_bytes"] >= report["rss_before_bytes"] > 0
    session = DecoderSession(path)
    assert (session.num_layers, session.levels, session.context_length, session.max_length) == (4, 3, 1024, 1024)


def test_bad_options_are_refused(tiny_checkpoint, tmp_path):
    for kw, match in (({"precision": "int3"}, "int3"), ({"logits": "first"}, "first"), ({"block_size": 24}, "24"),
                      ({"accuracy_level": 7}, "7")):
        with pytest.raises(UsageError, match=match):
            build_decoder(tiny_checkpoint, tmp_path / "decoder.onnx", **kw)
    assert not (tmp_path / "decoder.onnx").exists()
    # The graph builder takes the same options object, validated the same way.
    with pytest.raises(UsageError, match="int3"):
        build_decoder_model(tiny_checkpoint, precision="int3")


def test_failed_save_leaves_no_partial_files(tiny_checkpoint, tmp_path, monkeypatch):
    from qwen3vl_compile.errors import ExportError
    from qwen3vl_compile.export import decoder as decoder_module

    def half_written(model, path, progress=None):
        path.write_bytes(b"partial")
        path.with_name(path.name + ".data").write_bytes(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(decoder_module, "save_streaming", half_written)
    with pytest.raises(ExportError, match="No space left"):
        build_decoder(tiny_checkpoint, tmp_path / "decoder.onnx", precision="fp32")
    assert list(tmp_path.iterdir()) == []


# ---- fp32 parity --------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(PROMPTS))
def test_fp32_matches_hugging_face_prefill_and_decode(name, prompts, fp32_session):
    p = prompts[name]
    prefill, steps = _run(fp32_session, p)
    rel_prefill, rel_steps = _rel(prefill, p.ref_prefill), _rel(steps, p.ref_steps)
    print(f"{name}: prefill ({p.ids.shape[1]} positions) max abs {np.abs(prefill - p.ref_prefill).max():.2e} rel {rel_prefill:.2e}; "
          f"{DECODE_STEPS} decode steps max abs {np.abs(steps - p.ref_steps).max():.2e} rel {rel_steps:.2e}")
    assert prefill.shape == p.ref_prefill.shape and steps.shape == p.ref_steps.shape
    assert rel_prefill <= TOL and rel_steps <= TOL
    assert (prefill.argmax(-1) == p.ref_prefill.argmax(-1)).all()
    assert (steps.argmax(-1) == p.ref_steps.argmax(-1)).all()


def test_fp32_gate_passes_text_and_images_with_kv_cache(gate):
    """The compile's gate on the fp32 decoder: every case passes, far inside its tolerance."""
    _, parity = gate("fp32", logits="all")
    assert set(parity.cases) == {"text_only", "image", "two_images"}
    assert parity.passed, parity.failures()
    assert {o.tolerance for outs in parity.cases.values() for o in outs} == {TOL}
    assert parity.worst_rel < 1e-5  # measured ~1.9e-6; the gate is 1e-4
    j = parity.to_json()
    assert (j["layers_checked"], j["layers"], j["reference_dtype"]) == (4, 4, "float32")


def test_chunked_prefill_and_reused_session(prompts, fp32_session):
    """A prompt fed in two chunks (a second chat turn, say) equals one prefill; a session
    reused for another prompt is not disturbed by the stale rows of the previous one."""
    p = prompts["two_images"]
    cut = 11  # inside the first image
    s = fp32_session
    first = s.prefill(p.embeds[:, :cut], p.positions[..., :cut], p.deepstack[:, :, :cut])
    second = s.run(p.embeds[:, cut:], p.positions[..., cut:], p.deepstack[:, :, cut:])
    assert _rel(np.concatenate([first, second], 1), p.ref_prefill) <= TOL
    q = prompts["one_image"]  # shorter than the stale sequence
    prefill, steps = _run(s, q)
    assert _rel(prefill, q.ref_prefill) <= TOL and _rel(steps, q.ref_steps) <= TOL


def test_logits_last_is_the_last_row(prompts, decoders):
    session = DecoderSession(decoders(logits="last")[0], max_length=128)
    for p in prompts.values():
        prefill, steps = _run(session, p)
        assert prefill.shape == (1, 1, p.ref_prefill.shape[-1])
        assert _rel(prefill, p.ref_prefill[:, -1:]) <= TOL and _rel(steps, p.ref_steps) <= TOL


# ---- the gate sees the bugs it exists for ---------------------------------------------------
def test_dropped_deepstack_fails_the_gate(prompts, decoders, fp32_session):
    without = DecoderSession(decoders(deepstack=False)[0], max_length=128)
    assert not without.has_deepstack
    p = prompts["one_image"]
    rel_built_without = _rel(_run(without, p)[0], p.ref_prefill)
    rel_zeroed = _rel(_run(fp32_session, p, deepstack=np.zeros_like(p.deepstack))[0], p.ref_prefill)
    print(f"one_image without DeepStack: rel {rel_built_without:.3f} (built without), {rel_zeroed:.3f} (zeroed input)")
    assert rel_built_without > 100 * TOL and rel_zeroed > 100 * TOL
    # Text-only prompts do not use DeepStack: the same decoder passes there.
    t = prompts["text_only"]
    assert _rel(_run(without, t)[0], t.ref_prefill) <= TOL


def _wrong_positions(p: Prompt) -> dict[str, tuple[np.ndarray, float]]:
    """Wrong MRoPE positions for ``p``, each with the least error it must cause."""
    pos = p.positions
    image = p.image_mask.numpy()[0]
    after = np.arange(pos.shape[-1]) > np.flatnonzero(image).max()
    sequential = np.broadcast_to(np.arange(pos.shape[-1]), pos.shape).copy()  # MRoPE ignored
    off_by_one = pos.copy()
    off_by_one[:, :, after] += 1  # text after the image one position late
    rows_shifted = pos.copy()
    rows_shifted[1, :, image] += 1  # image height stream shifted by one row
    # A uniform shift of every position is invisible to rotary attention (only differences
    # between positions matter), so it is not a bug to look for.
    return {"sequential": (sequential, 100 * TOL), "swap_h_w": (pos[[0, 2, 1]], 10 * TOL),
            "text_after_image_+1": (off_by_one, 10 * TOL), "image_rows_+1": (rows_shifted, 10 * TOL)}


def test_wrong_mrope_positions_fail_the_gate(prompts, fp32_session):
    p = prompts["one_image"]
    for name, (pos, least) in _wrong_positions(p).items():
        rel = _rel(_run(fp32_session, p, positions=pos)[0], p.ref_prefill)
        print(f"one_image with {name} positions: rel {rel:.3e}")
        assert rel > least, name


@pytest.mark.slow  # three decoder builds and gates per precision
@pytest.mark.parametrize("precision", ["int4", "fp16"])
def test_reduced_precision_gate_sees_planted_bugs(tiny_checkpoint, gate, tmp_path, precision):
    """A decoder without DeepStack (the public recipe) or with the H and W MRoPE streams
    swapped fails the gate at the default precision (int4) and at fp16, on the image cases;
    the same gate passes the decoder built without the bug."""
    assert gate(precision)[1].passed, gate(precision)[1].failures()
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
        # Text-only prompts use neither DeepStack nor distinct H and W positions (all three
        # streams are equal), so both bugs show only on the image cases.
        assert all(o.passed for o in parity.cases["text_only"]), (bad, parity.failures())
        worst_image = max(o.max_rel for o in parity.cases["image"] if o.name == "logits")
        assert worst_image > 10 * 1e-4, (bad, worst_image)


# ---- reduced precisions -----------------------------------------------------------------------
def test_fp16_within_its_tolerance(prompts, decoders):
    session = DecoderSession(decoders(precision="fp16")[0], max_length=128)
    for name, p in prompts.items():
        prefill, steps = _run(session, p)
        rel = max(_rel(prefill, p.ref_prefill), _rel(steps, p.ref_steps))
        print(f"fp16 {name}: rel {rel:.2e}")
        # Visibly rounded against fp32 weights (measured ~1.4e-3); the compile gate compares
        # with fp16-rounded weights instead, at 1e-4.
        assert TOL < rel <= 2e-2


@pytest.mark.slow  # an int4 build and its gate
def test_int4_is_gated_against_the_dequantized_oracle(gate):
    """INT4 (accuracy_level 4, the default) is gated twice: at fp32 activations against
    Hugging Face with the same quantize-dequantized weights (exact: 1e-4), and at its own
    level with the measured int8-activation tolerance; the distance to the unquantized model
    is reported beside, not gated."""
    path, parity = gate("int4")
    assert parity.passed, parity.failures()
    assert not list(path.parent.glob("*accuracy0*"))  # the level-0 twin is removed
    for outs in parity.cases.values():
        exact, level4, unrounded = outs
        assert (exact.name, level4.name, unrounded.name) == ("logits", "logits_at_accuracy_level_4", "logits_vs_unrounded_fp32")
        assert exact.max_rel < 1e-5 and exact.tolerance == TOLERANCES[("decoder", "int4")] == 1e-4
        assert level4.tolerance == TOLERANCES[("decoder", "int4-activations")]
        assert 1e-3 < level4.max_rel < level4.tolerance  # int8 activations: visible, within the gate
        assert unrounded.max_rel > 0.1 and not np.isfinite(unrounded.tolerance)  # quantization cost, reported
    assert parity.golden_tolerance == level4.tolerance


def _row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(-1, a.shape[-1]).astype(np.float64), b.reshape(-1, b.shape[-1]).astype(np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


@pytest.mark.slow  # an int4 build
def test_int4_cosine_and_top1_against_fp32(prompts, decoders, fp32_session):
    """Reported, not gated: on random std-0.2 weights 4-bit rounding moves logits a lot
    (measured: mean row cosine ~0.9, min ~0.65, top-1 ~0.3 over a 152k vocabulary). The
    check is that the figures are computed from the right rows and that int4 logits are far
    closer to fp32 than unrelated logits are (fp32 rows of neighbouring positions: cosine ~0.2)."""
    path, report = decoders(precision="int4")
    assert report["quantization"] == {"bits": 4, "block_size": 32, "accuracy_level": 4, "symmetric": True, "lm_head": "int4"}
    assert report["sizes"]["total"] < decoders()[1]["sizes"]["total"] / 4
    int4 = DecoderSession(path, max_length=128)
    ours, fp32 = [], []
    for name, p in prompts.items():
        q = np.concatenate(_run(int4, p), 1)
        f = np.concatenate(_run(fp32_session, p), 1)
        m = measure("logits", q, f, float("inf"), logits=True)
        print(f"int4 vs fp32 {name}: cosine mean {_row_cosines(q, f).mean():.3f} min {m.cosine:.3f}, "
              f"top-1 agreement {m.top1_agreement:.3f} over {q.shape[1]} rows")
        ours.append(q[0]), fp32.append(f[0])
    q, f = np.concatenate(ours), np.concatenate(fp32)
    m = measure("logits", q, f, float("inf"), logits=True)
    assert np.isfinite(m.max_abs) and m.max_rel > 1e-3  # quantized, and visibly so
    # measure's own figures are those of these rows: the minimum row cosine and the share of
    # rows whose argmax agrees.
    assert m.cosine == pytest.approx(_row_cosines(q, f).min(), abs=1e-9)
    assert m.top1_agreement == (q.argmax(-1) == f.argmax(-1)).mean()
    assert measure("logits", f, f, float("inf"), logits=True).top1_agreement == 1.0
    unrelated = _row_cosines(f, np.roll(f, 1, axis=0)).mean()
    assert _row_cosines(q, f).mean() > max(0.8, unrelated + 0.4)


@pytest.mark.slow  # an int4 build and a second reference model
def test_int4_equals_hugging_face_with_dequantized_weights(tiny_checkpoint, hf, prompts, tmp_path):
    """What int4 must match exactly: Hugging Face with every Linear (lm_head included)
    replaced by its own quantize-dequantize round trip (accuracy_level 0 keeps activations fp32)."""
    import copy

    from qwen3vl_compile.export.quantize import dequantize_int4, quantize_int4

    path = tmp_path / "decoder.onnx"
    build_decoder(tiny_checkpoint, path, precision="int4", accuracy_level=0, logits="all", context_length=1024)
    model = copy.deepcopy(hf)
    with torch.no_grad():
        for mod in [*model.model.language_model.modules(), model.lm_head]:
            if isinstance(mod, torch.nn.Linear):
                w = mod.weight.detach().numpy()
                packed, scales = quantize_int4(w.T, 32)
                mod.weight = torch.nn.Parameter(torch.from_numpy(dequantize_int4(packed, scales, w.shape[1]).T.copy()))
    session = DecoderSession(path, max_length=128)
    for name in ("one_image", "two_images"):
        p = _prompt(model, PROMPTS[name], seed=7)
        prefill, steps = _run(session, p)
        assert _rel(prefill, p.ref_prefill) <= TOL and _rel(steps, p.ref_steps) <= TOL, name


# ---- the session refuses what it cannot run -------------------------------------------------
def test_session_refuses_bad_input(decoders):
    s = DecoderSession(decoders()[0], max_length=8)
    with pytest.raises(RuntimeInputError, match="step\\(\\) before prefill"):
        s.step(np.zeros((1, 1, 128), np.float32), np.zeros((3, 1, 1), np.int64))
    for call in (s.prefill, s.run):
        with pytest.raises(RuntimeInputError, match="exceeds the context of 8"):
            call(np.zeros((1, 9, 128), np.float32), np.zeros((3, 1, 9), np.int64))
    with pytest.raises(RuntimeInputError, match="position_ids must be"):
        s.prefill(np.zeros((1, 2, 128), np.float32), np.zeros((1, 2), np.int64))
    with pytest.raises(RuntimeInputError, match="rotary table of 1024"):
        s.prefill(np.zeros((1, 2, 128), np.float32), np.full((3, 1, 2), 1024, np.int64))
    with pytest.raises(RuntimeInputError, match="deepstack_embeds must be"):
        s.prefill(np.zeros((1, 2, 128), np.float32), np.zeros((3, 1, 2), np.int64), np.zeros((3, 1, 1, 128), np.float32))
