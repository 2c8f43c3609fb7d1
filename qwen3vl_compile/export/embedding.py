"""The embedding graph (``embedding.onnx``): token embeddings with the images scattered in.

Inputs:  ``input_ids [B, S]`` int64, ``image_features [M, H]`` float32 and
         ``deepstack_features [K, M, H]`` float32 for the M image (or video) pad tokens of
         the prompt, in order (M = 0 for text-only prompts and decode steps).
Outputs: ``inputs_embeds [B, S, H]``: ``embed_tokens[input_ids]`` with row i of
         ``image_features`` replacing the i-th pad token (Hugging Face's masked scatter);
         ``deepstack_embeds [K, B, S, H]``: the DeepStack levels at the same positions,
         zero on every other token (what the decoder adds after its first K layers).

                    input_ids
                   /         \\
      Gather(embed_tokens)   Equal(image_pad) | Equal(video_pad) -> NonZero -> Transpose
               |                                   | indices [M, 2]
               +---------------- ScatterND <-------+---- image_features
               |                                   |
         inputs_embeds        zeros [B, S, K, H] -> ScatterND <- deepstack [M, K, H]
                                                   -> Transpose -> deepstack_embeds

The number of pad tokens must equal M; ScatterND refuses a mismatch, and the runtime checks
it first to say so with both counts.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx_ir as ir

from ..model.checkpoint import Checkpoint
from ..bundle.records import GraphEntry, TensorInfo
from ..errors import UsageError
from ..options import DecoderOptions

INPUT_NAMES = ["input_ids", "image_features", "deepstack_features"]
OUTPUT_NAMES = ["inputs_embeds", "deepstack_embeds"]
OPSET = 18
EXTERNAL_DATA_THRESHOLD = 256 << 20


def _init(tensor: ir.TensorProtocol, registry: list[ir.Value]) -> ir.Value:
    v = ir.Value(name=tensor.name, const_value=tensor, type=ir.TensorType(tensor.dtype), shape=ir.Shape(tensor.shape))
    registry.append(v)
    return v


def _const(name: str, array: np.ndarray, registry: list[ir.Value]) -> ir.Value:
    v = ir.Value(
        name=name,
        const_value=ir.tensor(array, name=name),
        type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
        shape=ir.Shape(array.shape),
    )
    registry.append(v)
    return v


@dataclasses.dataclass(frozen=True)
class Int4Table:
    """The embedding table as the decoder's INT4 lm_head stores it (tied embeddings): packed
    uint8 ``[vocab, hidden/2]`` (MatMulNBits' ``[vocab, hidden/bs, bs/2]`` bytes) and fp32
    scales ``[vocab, hidden/bs]``, both read from the decoder's external data file."""

    data: ir.TensorProtocol
    scales: ir.TensorProtocol
    block_size: int
    hidden: int


def build_embedding_graph(embed_tokens, *, num_levels: int, pad_token_ids: tuple[int, ...]) -> ir.Model:
    """``embed_tokens``: an array [vocab, hidden] (fp32, bf16 or fp16) or an :class:`Int4Table`."""
    hidden = embed_tokens.hidden if isinstance(embed_tokens, Int4Table) else embed_tokens.shape[1]
    f32, i64 = ir.DataType.FLOAT, ir.DataType.INT64
    input_ids = ir.Value(name="input_ids", type=ir.TensorType(i64), shape=ir.Shape(["batch_size", "sequence_length"]))
    feats = ir.Value(name="image_features", type=ir.TensorType(f32), shape=ir.Shape(["num_image_tokens", hidden]))
    deep = ir.Value(
        name="deepstack_features", type=ir.TensorType(f32), shape=ir.Shape([num_levels, "num_image_tokens", hidden])
    )
    inits: list[ir.Value] = []

    def _const_(name, array):
        return _const(name, array, inits)

    nodes: list[ir.Node] = []

    def op(op_type, inputs, name, domain="", **attrs):
        n = ir.node(op_type, inputs, attributes=attrs, name=name, domain=domain)
        n.outputs[0].name = name
        nodes.append(n)
        return n.outputs[0]

    opsets = {"": OPSET}
    if isinstance(embed_tokens, Int4Table):
        data = _init(embed_tokens.data, inits)
        scales = _init(embed_tokens.scales, inits)
        embeds = op("GatherBlockQuantized", [data, input_ids, scales], "token_embeds", domain="com.microsoft",
                    gather_axis=0, quantize_axis=1, block_size=embed_tokens.block_size, bits=4)
        opsets["com.microsoft"] = 1
    else:
        table = _const_("embed_tokens.weight", np.ascontiguousarray(embed_tokens))
        embeds = op("Gather", [table, input_ids], "token_embeds", axis=0)
    if not isinstance(embed_tokens, Int4Table) and embed_tokens.dtype != np.float32:
        # Stored as in the checkpoint (bf16/fp16): the upcast to fp32 is exact, and it is what
        # Hugging Face does when it loads such a checkpoint in fp32.
        embeds = op("Cast", [embeds], "token_embeds_fp32", to=f32)
    mask = None
    for tid in pad_token_ids:
        eq = op("Equal", [input_ids, _const_(f"pad_id_{tid}", np.array(tid, np.int64))], f"is_pad_{tid}")
        mask = eq if mask is None else op("Or", [mask, eq], f"is_pad_or_{tid}")
    nz = op("NonZero", [mask], "pad_positions_t")  # [2, M]
    idx = op("Transpose", [nz], "pad_positions", perm=[1, 0])  # [M, 2] (batch, position)
    out_embeds = op("ScatterND", [embeds, idx, feats], "inputs_embeds")
    # DeepStack aligned to the sequence, zero on text tokens.
    shape = op("Shape", [embeds], "embeds_shape")  # [B, S, H]
    bs = op("Slice", [shape, _const_("zero", np.array([0], np.int64)), _const_("two", np.array([2], np.int64))], "bs_shape")
    kh = _const_("k_h", np.array([num_levels, hidden], np.int64))
    zshape = op("Concat", [bs, kh], "zeros_shape", axis=0)
    zeros = op("ConstantOfShape", [zshape], "deepstack_zeros", value=ir.tensor(np.zeros(1, np.float32)))
    deep_mkh = op("Transpose", [deep], "deepstack_mkh", perm=[1, 0, 2])
    scattered = op("ScatterND", [zeros, idx, deep_mkh], "deepstack_bskh")
    deep_out = op("Transpose", [scattered], "deepstack_embeds", perm=[2, 0, 1, 3])
    out_embeds.type, out_embeds.shape = ir.TensorType(f32), ir.Shape(["batch_size", "sequence_length", hidden])
    deep_out.type = ir.TensorType(f32)
    deep_out.shape = ir.Shape([num_levels, "batch_size", "sequence_length", hidden])

    graph = ir.Graph(
        inputs=[input_ids, feats, deep],
        outputs=[out_embeds, deep_out],
        nodes=nodes,
        initializers=inits,
        opset_imports=opsets,
        name="embedding",
    )
    return ir.Model(graph, ir_version=10, producer_name="qwen3vl-compile")


def shared_int4_table(decoder_path: Path, block_size: int) -> Int4Table:
    """Point at the decoder's INT4 lm_head bytes (no copy): the embedding graph then adds
    nothing to the bundle's size."""
    import onnx

    proto = onnx.load(str(decoder_path), load_external_data=False)
    found = {}
    for t in proto.graph.initializer:
        if t.name in ("/lm_head.qweight", "/lm_head.scales"):
            info = {e.key: e.value for e in t.external_data}
            found[t.name] = (info["location"], int(info["offset"]), int(info["length"]), list(t.dims))
    if len(found) != 2:
        raise UsageError(
            "--embedding-precision int4 shares the decoder's INT4 lm_head: it needs --precision int4, "
            "tied word embeddings and no --keep-lm-head-fp"
        )
    (loc, off, length, (vocab, kb, half)) = found["/lm_head.qweight"]
    hidden = kb * half * 2
    data = ir.ExternalTensor(loc, off, length, ir.DataType.UINT8, shape=ir.Shape([vocab, hidden // 2]),
                             name="embed_tokens.qweight", base_dir=decoder_path.parent)
    loc_s, off_s, len_s, dims_s = found["/lm_head.scales"]
    scales = ir.ExternalTensor(loc_s, off_s, len_s, ir.DataType.FLOAT, shape=ir.Shape(dims_s),
                               name="embed_tokens.scales", base_dir=decoder_path.parent)
    return Int4Table(data, scales, block_size, hidden)


def _table(ck: Checkpoint, key: str, precision: str) -> np.ndarray:
    """``auto``: the checkpoint's own dtype (bf16 stays bf16: half the size of fp32 and exact
    after the graph's upcast); ``fp32``: always fp32."""
    import torch

    t = ck.tensor(key)
    if precision == "fp32" or t.dtype == torch.float32:
        return t.float().numpy()
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.contiguous().view(torch.uint16).numpy().view(ml_dtypes.bfloat16)
    if t.dtype == torch.float16:
        return t.numpy()
    return t.float().numpy()


def build_embedding(ck: Checkpoint, out_dir: Path, options: DecoderOptions | None = None, **fields) -> GraphEntry:
    """Write ``embedding.onnx`` from the checkpoint's ``embed_tokens`` at
    ``options.embedding_precision``: exact for ``auto`` and ``fp32``; ``int4`` reuses the
    decoder's INT4 lm_head (decoder.onnx must exist). Keyword ``fields`` override single
    options (``embedding_precision="fp32"``)."""
    from qwen3vl_compile.passes.base import check_saved_model, run_passes
    from qwen3vl_compile.passes.check_model import CheckModelPass

    options = (options or DecoderOptions()).replace(**fields)
    precision, block_size = options.embedding_precision, options.block_size

    key = ck.find("embed_tokens.weight", ("model.language_model.", "model.", "language_model.model."))
    if precision == "int4":
        if not ck.tie_word_embeddings:
            raise UsageError("--embedding-precision int4 needs a checkpoint with tied word embeddings")
        weight = shared_int4_table(out_dir / "decoder.onnx", block_size)
        stored = "int4 (shared with the decoder's lm_head)"
    else:
        weight = _table(ck, key, precision)
        stored = str(weight.dtype)
    levels = len(ck.vision_config.get("deepstack_visual_indexes", []))
    pads = (ck.token_id("image_token_id"), ck.token_id("video_token_id"))
    model = build_embedding_graph(weight, num_levels=levels, pad_token_ids=pads)
    del weight
    path = out_dir / "embedding.onnx"
    data_files = []
    if precision == "int4":
        # The table stays an external reference into decoder.onnx.data: check the saved file.
        ir.save(model, path)
        data_files.append("decoder.onnx.data")
        reports = [check_saved_model(path, graph="embedding")]
        return _report(path, data_files, precision, stored, levels, ck, reports)
    model, reports = run_passes(model, (CheckModelPass(),), graph="embedding")
    if model.graph.initializers["embed_tokens.weight"].const_value.nbytes > EXTERNAL_DATA_THRESHOLD:
        ir.save(model, path, external_data="embedding.onnx.data")
        data_files.append("embedding.onnx.data")
    else:
        ir.save(model, path)
    return _report(path, data_files, precision, stored, levels, ck, reports)


def _report(path, data_files, precision, stored, levels, ck, reports) -> GraphEntry:
    hidden = ck.text_config["hidden_size"]
    T = TensorInfo
    return GraphEntry(
        file=path.name,
        kind="embedding",
        precision="int4" if precision == "int4" else "fp32",
        inputs=[T("input_ids", "int64", ("batch_size", "sequence_length")),
                T("image_features", "float32", ("num_image_tokens", hidden)),
                T("deepstack_features", "float32", (levels, "num_image_tokens", hidden))],
        outputs=[T("inputs_embeds", "float32", ("batch_size", "sequence_length", hidden)),
                 T("deepstack_embeds", "float32", (levels, "batch_size", "sequence_length", hidden))],
        data_files=data_files,
        passes=reports,
        details={"table_dtype": stored, "pad_token_ids": [ck.token_id("image_token_id"), ck.token_id("video_token_id")]},
    )


def reference_embedding(weight, input_ids: np.ndarray, image_features: np.ndarray, deepstack: np.ndarray, pad_ids):
    """Hugging Face's semantics in torch: embedding lookup, then ``masked_scatter`` of the
    image features onto the pad positions (Qwen3VLModel.forward), DeepStack likewise."""
    import torch

    ids = torch.from_numpy(input_ids)
    embeds = torch.nn.functional.embedding(ids, weight)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for t in pad_ids:
        mask |= ids == t
    mask3 = mask[..., None].expand_as(embeds)
    out = embeds.masked_scatter(mask3, torch.from_numpy(image_features))
    levels = []
    for k in range(deepstack.shape[0]):
        z = torch.zeros_like(embeds)
        levels.append(z.masked_scatter(mask3, torch.from_numpy(deepstack[k])))
    return {"inputs_embeds": out.numpy(), "deepstack_embeds": torch.stack(levels).numpy() if levels else np.zeros((0,) + tuple(embeds.shape), np.float32)}


def verify_embedding(onnx_path: Path, ck: Checkpoint, *, seed: int = 3, precision: str = "fp32", block_size: int = 32,
                     threads: int = 0):
    """Parity of embedding.onnx against the reference on a text-only and a two-image prompt.
    For ``int4`` the reference table rows are the INT4 lm_head's own quantize-dequantize
    round trip (the oracle, gated); the distance to the unquantized rows is reported."""
    from ..parity import TOLERANCES, GraphParity, measure
    from ..ort.session import ort_session

    key = ck.find("embed_tokens.weight", ("model.language_model.", "model.", "language_model.model."))
    weight = ck.tensor(key).float()
    hidden = weight.shape[1]
    levels = len(ck.vision_config.get("deepstack_visual_indexes", []))
    pad = ck.token_id("image_token_id")
    pads = (pad, ck.token_id("video_token_id"))
    rng = np.random.default_rng(seed)
    text = rng.integers(0, 1000, size=(1, 12)).astype(np.int64)
    two_images = np.concatenate([text[:, :3], np.full((1, 4), pad), text[:, 3:6], np.full((1, 6), pad), text[:, 6:]], axis=1)
    session = ort_session(onnx_path, threads)
    tol = TOLERANCES[("embedding", precision)]
    plain = weight
    if precision == "int4":  # rows are quantized independently: the rows used are enough
        import torch

        from .quantize import dequantize_int4, quantize_int4

        used = torch.from_numpy(np.unique(np.concatenate([text.ravel(), two_images.ravel()])))
        plain = weight[used]
        packed, scales = quantize_int4(plain.numpy().T, block_size)
        weight = torch.zeros((int(used.max()) + 1, hidden))
        weight[used] = torch.from_numpy(dequantize_int4(packed, scales, hidden).T.copy())
        plain = torch.zeros_like(weight).index_copy_(0, used, plain)
    cases, golden = {}, {}
    for case, ids in (("text_only", text), ("two_images", two_images)):
        m = int(np.isin(ids, pads).sum())
        feats = rng.standard_normal((m, hidden)).astype(np.float32)
        deep = rng.standard_normal((levels, m, hidden)).astype(np.float32)
        got = dict(zip(OUTPUT_NAMES, session.run(OUTPUT_NAMES, {"input_ids": ids, "image_features": feats, "deepstack_features": deep})))
        ref = reference_embedding(weight, ids, feats, deep, pads)
        cases[case] = [measure(k, got[k], ref[k], tol) for k in OUTPUT_NAMES]
        if precision == "int4":  # what the INT4 table costs: reported, not gated
            unrounded = reference_embedding(plain, ids, feats, deep, pads)["inputs_embeds"]
            cases[case].append(measure("inputs_embeds_vs_unrounded", got["inputs_embeds"], unrounded, float("inf")))
        if case == "two_images":
            golden = {"input_ids": ids, "image_features": feats, "deepstack_features": deep, **ref}
    what = f", rows quantize-dequantized (INT4, block {block_size})" if precision == "int4" else ""
    return GraphParity("embedding", "embedding", precision, f"torch embedding + masked_scatter (Qwen3VLModel.forward){what}",
                       cases, golden)
