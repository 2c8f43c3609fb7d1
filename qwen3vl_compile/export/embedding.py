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

from pathlib import Path

import numpy as np
import onnx_ir as ir

from ..checkpoint import Checkpoint

INPUT_NAMES = ["input_ids", "image_features", "deepstack_features"]
OUTPUT_NAMES = ["inputs_embeds", "deepstack_embeds"]
OPSET = 18
EXTERNAL_DATA_THRESHOLD = 256 << 20


def _const(name: str, array: np.ndarray, registry: list[ir.Value]) -> ir.Value:
    v = ir.Value(
        name=name,
        const_value=ir.tensor(array, name=name),
        type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
        shape=ir.Shape(array.shape),
    )
    registry.append(v)
    return v


def build_embedding_graph(embed_tokens: np.ndarray, *, num_levels: int, pad_token_ids: tuple[int, ...]) -> ir.Model:
    vocab, hidden = embed_tokens.shape
    f32, i64 = ir.DataType.FLOAT, ir.DataType.INT64
    input_ids = ir.Value(name="input_ids", type=ir.TensorType(i64), shape=ir.Shape(["batch_size", "sequence_length"]))
    feats = ir.Value(name="image_features", type=ir.TensorType(f32), shape=ir.Shape(["num_image_tokens", hidden]))
    deep = ir.Value(
        name="deepstack_features", type=ir.TensorType(f32), shape=ir.Shape([num_levels, "num_image_tokens", hidden])
    )
    inits: list[ir.Value] = []

    def _const_(name, array):
        return _const(name, array, inits)

    table = _const_("embed_tokens.weight", np.ascontiguousarray(embed_tokens))
    nodes: list[ir.Node] = []

    def op(op_type, inputs, name, **attrs):
        n = ir.node(op_type, inputs, attributes=attrs, name=name)
        n.outputs[0].name = name
        nodes.append(n)
        return n.outputs[0]

    embeds = op("Gather", [table, input_ids], "token_embeds", axis=0)
    if embed_tokens.dtype != np.float32:
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
        opset_imports={"": OPSET},
        name="embedding",
    )
    return ir.Model(graph, ir_version=10, producer_name="qwen3vl-compile")


EMBEDDING_PRECISIONS = ("auto", "fp32")


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


def build_embedding(ck: Checkpoint, out_dir: Path, *, precision: str = "auto") -> dict:
    """Write ``embedding.onnx`` from the checkpoint's ``embed_tokens`` (exact either way)."""
    from qwen3vl_compile.passes.base import run_passes
    from qwen3vl_compile.passes.check_model import CheckModelPass

    key = ck.find("embed_tokens.weight", ("model.language_model.", "model.", "language_model.model."))
    weight = _table(ck, key, precision)
    stored = str(weight.dtype)
    levels = len(ck.vision_config.get("deepstack_visual_indexes", []))
    pads = (ck.config.get("image_token_id", 151655), ck.config.get("video_token_id", 151656))
    model = build_embedding_graph(weight, num_levels=levels, pad_token_ids=pads)
    del weight
    model, reports = run_passes(model, (CheckModelPass(),), graph="embedding")
    path = out_dir / "embedding.onnx"
    nbytes = model.graph.initializers["embed_tokens.weight"].const_value.nbytes
    data_files = []
    if nbytes > EXTERNAL_DATA_THRESHOLD:
        ir.save(model, path, external_data="embedding.onnx.data")
        data_files.append("embedding.onnx.data")
    else:
        ir.save(model, path)
    hidden = ck.text_config["hidden_size"]
    return {
        "file": path.name,
        "data_files": data_files,
        "kind": "embedding",
        "precision": "fp32",
        "table_dtype": stored,
        "inputs": [
            {"name": "input_ids", "dtype": "int64", "shape": ["batch_size", "sequence_length"]},
            {"name": "image_features", "dtype": "float32", "shape": ["num_image_tokens", hidden]},
            {"name": "deepstack_features", "dtype": "float32", "shape": [levels, "num_image_tokens", hidden]},
        ],
        "outputs": [
            {"name": "inputs_embeds", "dtype": "float32", "shape": ["batch_size", "sequence_length", hidden]},
            {"name": "deepstack_embeds", "dtype": "float32", "shape": [levels, "batch_size", "sequence_length", hidden]},
        ],
        "pad_token_ids": list(pads),
        "passes": reports,
    }


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


def verify_embedding(onnx_path: Path, ck: Checkpoint, *, seed: int = 3):
    """Parity of embedding.onnx against the reference on a text-only and a two-image prompt."""
    import onnxruntime as ort

    from ..verify import TOLERANCES, GraphParity, measure

    key = ck.find("embed_tokens.weight", ("model.language_model.", "model.", "language_model.model."))
    weight = ck.tensor(key).float()
    hidden = weight.shape[1]
    levels = len(ck.vision_config.get("deepstack_visual_indexes", []))
    pad = ck.config.get("image_token_id", 151655)
    pads = (pad, ck.config.get("video_token_id", 151656))
    rng = np.random.default_rng(seed)
    text = rng.integers(0, 1000, size=(1, 12)).astype(np.int64)
    two_images = np.concatenate([text[:, :3], np.full((1, 4), pad), text[:, 3:6], np.full((1, 6), pad), text[:, 6:]], axis=1)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    tol = TOLERANCES[("embedding", "fp32")]
    cases, golden = {}, {}
    for case, ids in (("text_only", text), ("two_images", two_images)):
        m = int(np.isin(ids, pads).sum())
        feats = rng.standard_normal((m, hidden)).astype(np.float32)
        deep = rng.standard_normal((levels, m, hidden)).astype(np.float32)
        got = dict(zip(OUTPUT_NAMES, session.run(OUTPUT_NAMES, {"input_ids": ids, "image_features": feats, "deepstack_features": deep})))
        ref = reference_embedding(weight, ids, feats, deep, pads)
        cases[case] = [measure(k, got[k], ref[k], tol) for k in OUTPUT_NAMES]
        if case == "two_images":
            golden = {"input_ids": ids, "image_features": feats, "deepstack_features": deep, **ref}
    return GraphParity("embedding", "embedding", "fp32", "torch embedding + masked_scatter (Qwen3VLModel.forward)", cases, golden)
