"""embedding.onnx against what Hugging Face's own forward hands to its language model."""

import numpy as np
import onnxruntime as ort
import pytest
import torch

from qwen3vl_compile.export.embedding import OUTPUT_NAMES, build_embedding

IMAGE_PAD = 151655


@pytest.fixture(scope="module")
def embedding_session(tiny_checkpoint, tmp_path_factory):
    d = tmp_path_factory.mktemp("embedding")
    report = build_embedding(tiny_checkpoint, d)
    assert report.kind == "embedding" and report.passes[0].name == "CheckModelPass"
    return ort.InferenceSession(str(d / report.file))


@pytest.fixture(scope="module")
def hf_model(tiny_checkpoint):
    return tiny_checkpoint.load_full_model()


def _hf_language_model_inputs(model, input_ids, pixel_values=None, grid=None):
    """Run Hugging Face's Qwen3VLModel.forward and capture what it passes to the text model."""
    captured = {}

    def hook(module, args, kwargs):
        captured.update(kwargs)

    handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        kwargs = {}
        if pixel_values is not None:
            kwargs = dict(pixel_values=pixel_values, image_grid_thw=grid, mm_token_type_ids=(input_ids == IMAGE_PAD).int())
        with torch.no_grad():
            model.model(input_ids=input_ids, **kwargs)
    finally:
        handle.remove()
    return captured


def _prompt(rng, grids):
    parts = [rng.integers(0, 1000, 5)]
    for _, h, w in grids:
        parts += [np.array([151652]), np.full(h * w // 4, IMAGE_PAD), np.array([151653]), rng.integers(0, 1000, 3)]
    return torch.from_numpy(np.concatenate(parts)[None].astype(np.int64))


@pytest.mark.parametrize("grids", [[], [(1, 8, 8)], [(1, 8, 8), (1, 6, 10)]])
def test_embedding_matches_hf(embedding_session, hf_model, grids):
    rng = np.random.default_rng(len(grids))
    ids = _prompt(rng, grids)
    if grids:
        n = sum(t * h * w for t, h, w in grids)
        pixel_values = torch.from_numpy(rng.uniform(-1, 1, (n, 1536)).astype(np.float32))
        grid = torch.tensor(grids)
        with torch.no_grad():
            out = hf_model.model.get_image_features(pixel_values, grid)
        feats = torch.cat(out.pooler_output).numpy()
        deep = np.stack([torch.cat(level).numpy() for level in out.deepstack_features])
    else:
        pixel_values = grid = None
        feats, deep = np.zeros((0, 128), np.float32), np.zeros((3, 0, 128), np.float32)
    hf = _hf_language_model_inputs(hf_model, ids, pixel_values, grid)
    embeds, deepstack = embedding_session.run(
        OUTPUT_NAMES, {"input_ids": ids.numpy(), "image_features": feats, "deepstack_features": deep}
    )
    np.testing.assert_array_equal(embeds, hf["inputs_embeds"].numpy())
    mask = (ids == IMAGE_PAD).numpy()
    assert not deepstack[:, ~mask].any()  # zero on every text token
    if grids:
        assert hf["visual_pos_masks"].numpy().tolist() == mask.tolist()
        for k, level in enumerate(hf["deepstack_visual_embeds"]):
            np.testing.assert_array_equal(deepstack[k][mask], level.numpy())


def test_pad_count_mismatch_is_refused(embedding_session):
    ids = np.array([[1, IMAGE_PAD, IMAGE_PAD, 2]], np.int64)
    with pytest.raises(Exception, match="ScatterND|updates"):
        embedding_session.run(
            OUTPUT_NAMES,
            {"input_ids": ids, "image_features": np.zeros((3, 128), np.float32), "deepstack_features": np.zeros((3, 3, 128), np.float32)},
        )


def test_bf16_table_is_kept_and_upcast_exactly(tmp_path):
    """A bf16 checkpoint's table stays bf16 on disk (half the bytes) and the graph's output
    equals the fp32 upcast Hugging Face does when it loads the checkpoint in fp32."""
    import ml_dtypes
    import onnx_ir as ir

    from qwen3vl_compile.export.embedding import build_embedding_graph

    w = torch.randn(1000, 16, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    model = build_embedding_graph(w.view(torch.uint16).numpy().view(ml_dtypes.bfloat16), num_levels=3, pad_token_ids=(999,))
    assert model.graph.initializers["embed_tokens.weight"].dtype == ir.DataType.BFLOAT16
    ir.save(model, tmp_path / "e.onnx")
    s = ort.InferenceSession(str(tmp_path / "e.onnx"))
    ids = np.array([[1, 5, 999, 7]], np.int64)
    feats = np.full((1, 16), 2.0, np.float32)
    embeds, _ = s.run(OUTPUT_NAMES, {"input_ids": ids, "image_features": feats, "deepstack_features": np.zeros((3, 1, 16), np.float32)})
    np.testing.assert_array_equal(embeds[0, [0, 1, 3]], w.float().numpy()[[1, 5, 7]])
    np.testing.assert_array_equal(embeds[0, 2], feats[0])


def test_int4_embedding_shares_the_lm_head_bytes(tiny_checkpoint, tmp_path):
    """--embedding-precision int4: the embedding graph points into decoder.onnx.data (no bytes
    of its own) and returns exactly the dequantized rows of the INT4 lm_head."""
    from qwen3vl_compile.export.decoder import build_decoder
    from qwen3vl_compile.export.quantize import dequantize_int4, quantize_int4

    build_decoder(tiny_checkpoint, tmp_path / "decoder.onnx", precision="int4", context_length=256)
    report = build_embedding(tiny_checkpoint, tmp_path, embedding_precision="int4")
    assert report.precision == "int4" and report.data_files == ["decoder.onnx.data"]
    assert (tmp_path / "embedding.onnx").stat().st_size < 10_000
    w = tiny_checkpoint.tensor("model.language_model.embed_tokens.weight").float().numpy()
    deq = dequantize_int4(*quantize_int4(w.T.copy(), 32), w.shape[1]).T
    ids = np.array([[0, 17, 151643, 99999]], np.int64)
    s = ort.InferenceSession(str(tmp_path / "embedding.onnx"))
    embeds, _ = s.run(OUTPUT_NAMES, {"input_ids": ids, "image_features": np.zeros((0, 128), np.float32),
                                     "deepstack_features": np.zeros((3, 0, 128), np.float32)})
    np.testing.assert_allclose(embeds[0], deq[ids[0]], rtol=0, atol=1e-6)
    assert np.abs(embeds[0] - w[ids[0]]).max() > 1e-3  # quantized: not the fp32 table
    # The compile-time gate: exact against the quantize-dequantize oracle, and a table
    # quantized another way (block 64 oracle for block-32 bytes) fails it.
    from qwen3vl_compile.export.embedding import verify_embedding

    parity = verify_embedding(tmp_path / "embedding.onnx", tiny_checkpoint, precision="int4", block_size=32)
    assert parity.passed, parity.failures()
    assert max(o.max_rel for outs in parity.cases.values() for o in outs if o.name != 'inputs_embeds_vs_unrounded') < 1e-6
    reported = [o for outs in parity.cases.values() for o in outs if o.name == "inputs_embeds_vs_unrounded"]
    assert reported and all(o.max_rel > 1e-3 for o in reported)
    assert not verify_embedding(tmp_path / "embedding.onnx", tiny_checkpoint, precision="int4", block_size=64).passed
