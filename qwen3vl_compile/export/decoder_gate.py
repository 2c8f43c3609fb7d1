"""The decoder's parity gate: ``decoder.onnx`` against Hugging Face's text model in fp32.

**The reference is always fp32**: every weight is read from the checkpoint and upcast
exactly (bf16 -> fp32 is exact). To keep memory bounded on real sizes the comparison runs on
a *layer-truncated* model when the full fp32 text model does not fit :data:`FULL_DEPTH_BUDGET`:
the decoder is built again by the same builder, with the same options, from the same weights,
for its first ``N`` layers (plus the final norm and lm_head), and compared with Hugging Face
cut to the same ``N`` layers. ``N`` is at least the number of DeepStack levels + 1, so every
DeepStack injection and the layer after it are inside the checked slice; it is recorded in
the manifest (``layers_checked`` of ``layers``).

**Every precision is gated against the exact oracle**: Hugging Face with the weights the
decoder stores (fp32: as they are; fp16: rounded to half precision; int4: each quantized
Linear replaced by its own quantize-dequantize round trip, lm_head too unless it is kept in
floating point). What is left is the graph's own arithmetic (and for int4 at
``accuracy_level`` 4, int8 activations), measured against :data:`..verify.TOLERANCES`. The
distance to the *unquantized* model (cosine, top-1 agreement, relative error) is reported
beside it, not gated: it is the cost of the precision the user chose.

Cases, all through :class:`~qwen3vl_compile.ort.decoder_session.DecoderSession` (the
runtime's own KV-cache path), each a prefill and 3 decode steps:

- ``text_only``: sequential positions;
- ``image`` and ``two_images``: random image features scattered onto the pad tokens,
  DeepStack levels at the same rows, MRoPE positions from Hugging Face's ``get_rope_index``,
  decode positions offset by its ``rope_delta``.

The ONNX side runs first and is freed before the reference is loaded, so the two never share
memory.
"""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import numpy as np

from ..model.checkpoint import Checkpoint
from ..options import DecoderOptions
from ..parity import TOLERANCES, GraphParity, measure
from .text_decoder import TEXT_PREFIXES, DecoderSpec

# Bytes of fp32 text weights (layers + lm_head) up to which the whole depth is checked.
FULL_DEPTH_BUDGET = 2 << 30
# Above this many bytes of fp32 weights in the checked slice, the reference is run one
# layer at a time (run_reference_streaming).
STREAMING_THRESHOLD = 12 << 30
DECODE_STEPS = 3
# Elements rounded at a time by the oracle (bounds the scratch memory of an lm_head).
ROUND_CHUNK_ELEMENTS = 16 << 20
# (case, grids): grids in patches (t, h, w); merged tokens = h * w / merge^2.
CASES = (("text_only", ()), ("image", ((1, 6, 8),)), ("two_images", ((1, 4, 4), (1, 6, 4))))


def text_weight_bytes(ck: Checkpoint, layers: int | None = None) -> int:
    """fp32 bytes of the text layers (all, or the first ``layers``) plus the lm_head."""
    from ..model.support import is_moe_layer, num_experts

    spec = DecoderSpec.from_checkpoint(ck, 1)
    t = ck.text_config
    n = spec.layers if layers is None else layers
    h, hd = spec.hidden, spec.head_dim
    attn = h * hd * (2 * spec.heads + 2 * spec.kv_heads)
    dense = 3 * h * spec.intermediate
    sparse = num_experts(t) * (3 * h * t.get("moe_intermediate_size", 0) + h)
    mlp = sum(sparse if is_moe_layer(t, i) else dense for i in range(n))
    return 4 * (n * attn + mlp + spec.vocab * h)


def gate_layers(ck: Checkpoint) -> int:
    """How many layers the gate compares: all when they fit the budget, else DeepStack
    levels + 1 (at least 2)."""
    spec = DecoderSpec.from_checkpoint(ck, 1)
    if text_weight_bytes(ck) <= FULL_DEPTH_BUDGET:
        return spec.layers
    return min(spec.layers, max(spec.deepstack_levels + 1, 2))


@dataclasses.dataclass
class _Case:
    ids: np.ndarray  # [1, S]
    mask: np.ndarray  # [1, S] bool, image pads
    grids: tuple
    embeds: np.ndarray  # [1, S, H] with image features scattered
    deepstack: np.ndarray  # [K, 1, S, H]
    positions: np.ndarray  # [3, 1, S]
    delta: int
    step_ids: np.ndarray  # [DECODE_STEPS]
    step_embeds: np.ndarray  # [DECODE_STEPS, 1, 1, H]

    def step_positions(self, t: int) -> np.ndarray:
        return np.full((3, 1, 1), self.ids.shape[1] + t + self.delta, np.int64)


def _reference_skeleton(ck: Checkpoint, layers: int):
    """The Hugging Face model class of this checkpoint, cut to ``layers`` text layers, on the
    meta device: nothing allocated until weights are assigned."""
    import torch

    cfg = ck.hf_config()
    cfg.text_config.num_hidden_layers = layers
    with torch.device("meta"):
        model = ck.hf_class()(cfg)
    return model.eval()


def _set_param(root, name: str, tensor) -> None:
    import torch

    owner, _, attr = name.rpartition(".")
    setattr(root.get_submodule(owner) if owner else root, attr, torch.nn.Parameter(tensor, requires_grad=False))


def load_text_reference(ck: Checkpoint, layers: int):
    """Hugging Face's model with its first ``layers`` text layers, final norm and lm_head in
    fp32 read from the checkpoint (the vision tower and the embedding table stay on the meta
    device: the gate feeds ``inputs_embeds``)."""
    model = _reference_skeleton(ck, layers)
    lm = model.model.language_model
    for name, meta in list(lm.named_parameters()):
        if name.startswith("embed_tokens."):
            continue
        _set_param(lm, name, _reference_tensor(ck, name, tuple(meta.shape)))
    _load_lm_head(ck, model)
    # Non-persistent buffers (rotary inv_freq) are not in the checkpoint: build them.
    lm.rotary_emb = type(lm.rotary_emb)(config=model.config.text_config)
    left = [n for n, p in [*lm.named_parameters(), *lm.named_buffers()] if p.is_meta and not n.startswith("embed_tokens.")]
    if left:
        raise ValueError(f"reference weights not loaded: {left[:5]}")
    return model


def _reference_tensor(ck: Checkpoint, name: str, shape: tuple[int, ...]):
    """The checkpoint's tensor for parameter ``name`` of the text model, fp32, in the layout
    the module holds. MoE experts may be stored fused in the Hub's layout ([E, H, 2I] /
    [E, I, H]: transposed, as transformers 5's loader says) or one tensor per expert."""
    import torch

    experts = name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj"))
    if experts and not any(p + name in ck.keys() for p in TEXT_PREFIXES):
        base = name.rsplit(".", 1)[0]
        parts = ("gate_proj", "up_proj") if name.endswith("gate_up_proj") else ("down_proj",)
        per_expert = [torch.cat([ck.tensor(ck.find(f"{base}.{e}.{part}.weight", TEXT_PREFIXES)) for part in parts])
                      for e in range(shape[0])]
        return torch.stack(per_expert).to(torch.float32)
    t = ck.tensor(ck.find(name, TEXT_PREFIXES)).to(torch.float32)
    if tuple(t.shape) != shape and experts and tuple(t.transpose(1, 2).shape) == shape:
        t = t.transpose(1, 2).contiguous()
    if tuple(t.shape) != shape:
        raise ValueError(f"{name}: checkpoint shape {tuple(t.shape)}, the model expects {shape}")
    return t


def _load_lm_head(ck: Checkpoint, model) -> None:
    """lm_head in fp32: the embedding table when tied, else the checkpoint's lm_head."""
    import torch

    from .text_decoder import _lm_head_key

    key = ck.find("embed_tokens.weight", TEXT_PREFIXES) if ck.tie_word_embeddings else _lm_head_key(ck)
    model.lm_head.weight = torch.nn.Parameter(ck.tensor(key).to(torch.float32), requires_grad=False)


def _rounded_matrices(module, options: DecoderOptions) -> list:
    """The parameters of ``module`` (a decoder layer or the whole stack) that the decoder
    stores in reduced precision, as [..., N, K] matrices: every Linear, MoE experts
    [E, N, K], and (fp16 only: int4 keeps it fp32) the MoE router."""
    import torch

    mats = [m.weight for m in module.modules() if isinstance(m, torch.nn.Linear)]
    for mod in module.modules():
        if hasattr(mod, "gate_up_proj") and isinstance(getattr(mod, "down_proj", None), torch.nn.Parameter):
            mats += [mod.gate_up_proj, mod.down_proj]
        elif options.precision == "fp16" and type(mod).__name__.endswith("TopKRouter"):
            mats.append(mod.weight)
    return mats


def _round(params, options: DecoderOptions) -> int:
    """Replace each parameter in place by what the decoder computes with; returns the number
    of matrices (experts counted one by one)."""
    import torch

    from .quantize import dequantize_int4, quantize_int4

    def round_in_place(w):  # [N, K], rounded row block by row block: no full-size copy
        step = max(1, ROUND_CHUNK_ELEMENTS // max(w.shape[1], 1))
        for r0 in range(0, w.shape[0], step):
            block = w[r0:r0 + step]
            if options.precision == "fp16":
                block.copy_(block.to(torch.float16))
            else:  # int4 blocks run along K within one row: rows are independent
                packed, scales = quantize_int4(block.numpy().T, options.block_size)
                block.copy_(torch.from_numpy(dequantize_int4(packed, scales, w.shape[1]).T))

    count = 0
    with torch.no_grad():
        for p in params:
            for w in (p.data if p.ndim == 3 else [p.data]):
                round_in_place(w)
                count += 1
    return count


def _head_is_rounded(options: DecoderOptions) -> bool:
    return options.precision == "fp16" or (options.precision == "int4" and not options.keep_lm_head_fp)


def round_like_decoder(model, options: DecoderOptions) -> int:
    """Replace, in place, every weight the decoder stores in reduced precision by what the
    decoder computes with. Returns how many matrices were rounded."""
    if options.precision == "fp32":
        return 0
    mats = _rounded_matrices(model.model.language_model.layers, options)
    if _head_is_rounded(options):
        mats.append(model.lm_head.weight)
    return _round(mats, options)


def _cases(ck: Checkpoint, skeleton, seed: int) -> dict[str, _Case]:
    """Prompts with embeddings read from the checkpoint's table and HF's MRoPE positions."""
    import torch

    image_id = ck.token_id("image_token_id")
    vs, ve = ck.token_id("vision_start_token_id"), ck.token_id("vision_end_token_id")
    merge = ck.vision_config["spatial_merge_size"]
    spec = DecoderSpec.from_checkpoint(ck, 1)
    gen = np.random.default_rng(seed)
    raw = {}
    for name, grids in CASES:
        parts = [gen.integers(0, 5000, 5)]
        for _, h, w in grids:
            parts += [[vs], np.full(h * w // merge**2, image_id), [ve], gen.integers(0, 5000, 3)]
        parts.append(gen.integers(0, 5000, 4))
        raw[name] = (np.concatenate(parts).astype(np.int64)[None], grids, gen.integers(0, 5000, DECODE_STEPS))
    # One read of the table, only the rows used.
    used = sorted({int(t) for ids, _, steps in raw.values() for t in (*ids[0], *steps)})
    table = ck.tensor(ck.find("embed_tokens.weight", TEXT_PREFIXES))
    rows = dict(zip(used, table[torch.tensor(used)].to(torch.float32).numpy()))
    del table
    cases = {}
    for name, (ids, grids, steps) in raw.items():
        mask = ids == image_id
        embeds = np.stack([rows[int(t)] for t in ids[0]])[None].astype(np.float32)
        deep = np.zeros((spec.deepstack_levels, *embeds.shape), np.float32)
        n = int(mask.sum())
        if n:
            embeds[mask] = gen.standard_normal((n, spec.hidden)).astype(np.float32)
            for k in range(spec.deepstack_levels):
                deep[k][mask] = gen.standard_normal((n, spec.hidden)).astype(np.float32)
            pos, delta = skeleton.model.get_rope_index(
                torch.from_numpy(ids), mm_token_type_ids=torch.from_numpy(mask.astype(np.int32)),
                image_grid_thw=torch.tensor(grids))
            pos, delta = pos.numpy().astype(np.int64), int(delta.reshape(-1)[0])
        else:
            pos, delta = np.broadcast_to(np.arange(ids.shape[1]), (3, 1, ids.shape[1])).astype(np.int64).copy(), 0
        step_embeds = np.stack([rows[int(t)] for t in steps])[:, None, None, :].astype(np.float32)
        cases[name] = _Case(ids, mask, grids, embeds, deep, pos, delta, steps, step_embeds)
    return cases


def run_onnx(path: Path, cases: dict[str, _Case], *, threads: int = 0) -> dict[str, np.ndarray]:
    """Last-position prefill logits then each decode step's: ``[1 + DECODE_STEPS, vocab]``."""
    from ..ort.decoder_session import DecoderSession

    session = DecoderSession(path, max_length=256, threads=threads)
    return {name: _decode_rows(session, c.embeds, c.positions, c.deepstack, c.step_embeds,
                               [c.step_positions(t) for t in range(DECODE_STEPS)]) for name, c in cases.items()}


def _decode_rows(session, embeds, positions, deepstack, step_embeds, step_positions) -> np.ndarray:
    """A prefill then one decode step per entry of ``step_embeds``: the last position's
    logits of each call, ``[1 + steps, vocab]``."""
    rows = [session.prefill(embeds, positions, deepstack if session.has_deepstack else None)[0, -1]]
    for e, p in zip(step_embeds, step_positions):
        rows.append(session.step(e, p)[0, -1])
    return np.stack(rows)


def run_reference(model, cases: dict[str, _Case]) -> dict[str, np.ndarray]:
    """The same calls through Hugging Face's text model and lm_head with a DynamicCache."""
    import torch
    from transformers import DynamicCache

    lm = model.model.language_model
    cache_kw = "cache" if "cache" in inspect.signature(type(lm).forward).parameters else "past_key_values"
    out = {}
    with torch.no_grad():
        for name, c in cases.items():
            cache = DynamicCache(config=model.config.text_config)
            mask = torch.from_numpy(c.mask)
            deep = [torch.from_numpy(c.deepstack[k][c.mask]) for k in range(c.deepstack.shape[0])] if c.mask.any() else None
            h = lm(inputs_embeds=torch.from_numpy(c.embeds), position_ids=torch.from_numpy(c.positions),
                   attention_mask=torch.ones(c.ids.shape, dtype=torch.long), visual_pos_masks=mask if deep else None,
                   deepstack_visual_embeds=deep, use_cache=True, **{cache_kw: cache}).last_hidden_state
            rows = [model.lm_head(h[:, -1]).numpy()[0]]
            for t in range(DECODE_STEPS):
                length = c.ids.shape[1] + t + 1
                h = lm(inputs_embeds=torch.from_numpy(c.step_embeds[t]), position_ids=torch.from_numpy(c.step_positions(t)),
                       attention_mask=torch.ones((1, length), dtype=torch.long), use_cache=True,
                       **{cache_kw: cache}).last_hidden_state
                rows.append(model.lm_head(h[:, -1]).numpy()[0])
            out[name] = np.stack(rows)
    return out


def _load_layer(ck: Checkpoint, lm, index: int) -> None:
    for name, meta in list(lm.layers[index].named_parameters()):
        full = f"layers.{index}.{name}"
        _set_param(lm.layers[index], name, _reference_tensor(ck, full, tuple(meta.shape)))


def _free_layer(lm, index: int) -> None:
    import torch

    for name, p in list(lm.layers[index].named_parameters()):
        _set_param(lm.layers[index], name, torch.empty(p.shape, device="meta"))


def run_reference_streaming(ck: Checkpoint, layers: int, options: DecoderOptions,
                            cases: dict[str, _Case]) -> tuple[dict, dict, int]:
    """The plain and the rounded (oracle) reference, one decoder layer in memory at a time:
    for a slice whose fp32 weights exceed memory (a 235B-A22B layer is 9.7 GB in fp32).

    Layer-major order: every call (each case's prefill and decode steps) goes through layer
    l before layer l+1 is read; each (variant, case) keeps its own Hugging Face
    ``DynamicCache`` (layers index their own slot) and the hidden states between layers.
    Each layer is Hugging Face's own decoder layer; what ``Qwen3VLTextModel.forward`` adds
    around it is repeated here: rotary embeddings from the 3-stream positions, SDPA's
    causal mask (``attention_mask=None``: causal for a prefill, all past for one new token),
    DeepStack after layers 0..K-1, final norm and lm_head."""
    import torch
    from transformers import DynamicCache

    model = _reference_skeleton(ck, layers)
    model.config.text_config._attn_implementation = "sdpa"
    lm = model.model.language_model
    for layer in lm.layers:
        layer.self_attn.config._attn_implementation = "sdpa"
    _set_param(lm, "norm.weight", _reference_tensor(ck, "norm.weight", tuple(lm.norm.weight.shape)))
    lm.rotary_emb = type(lm.rotary_emb)(config=model.config.text_config)
    variants = ("plain", "oracle") if options.precision != "fp32" else ("plain",)
    caches = {(v, n): DynamicCache(config=model.config.text_config) for v in variants for n in cases}
    # hidden[(variant, case)]: the prefill's [1, S, H] then each step's [1, 1, H]
    hidden = {(v, n): [torch.from_numpy(c.embeds)] + [torch.from_numpy(e) for e in c.step_embeds]
              for v in variants for n, c in cases.items()}
    rotary = {}
    with torch.no_grad():
        for n, c in cases.items():
            calls = [c.positions] + [c.step_positions(t) for t in range(DECODE_STEPS)]
            rotary[n] = [lm.rotary_emb(hidden[(variants[0], n)][j], torch.from_numpy(p)) for j, p in enumerate(calls)]
        rounded = 0
        for index in range(layers):
            _load_layer(ck, lm, index)
            for v in variants:
                if v == "oracle":
                    rounded += _round(_rounded_matrices(lm.layers[index], options), options)
                for n, c in cases.items():
                    states = hidden[(v, n)]
                    for j in range(len(states)):
                        out = lm.layers[index](states[j], attention_mask=None, position_ids=None,
                                               cache=caches[(v, n)], position_embeddings=rotary[n][j])
                        out = out[0] if isinstance(out, tuple) else out
                        if j == 0 and index < c.deepstack.shape[0] and c.mask.any():
                            out = out.clone()
                            out[torch.from_numpy(c.mask)] += torch.from_numpy(c.deepstack[index][c.mask])
                        states[j] = out
            _free_layer(lm, index)
        _load_lm_head(ck, model)
        results = {}
        for v in variants:
            if v == "oracle" and _head_is_rounded(options):
                rounded += _round([model.lm_head.weight], options)
            results[v] = {n: np.stack([model.lm_head(lm.norm(h)[:, -1]).numpy()[0] for h in hidden[(v, n)]])
                          for n in cases}
    return results["plain"], results.get("oracle", results["plain"]), rounded


def with_accuracy_level(path: Path, level: int) -> Path:
    """A sibling of ``path`` whose quantized nodes (MatMulNBits, QMoE) compute at
    ``accuracy_level`` ``level`` (0: fp32 activations), sharing ``path``'s external data
    file. The caller removes it."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for node in model.graph.node:
        if node.op_type in ("MatMulNBits", "QMoE"):
            for a in node.attribute:
                if a.name == "accuracy_level":
                    a.i = level
    out = path.with_name(f"{path.stem}.accuracy{level}{path.suffix}")
    onnx.save(model, str(out))
    return out


def verify_decoder(onnx_path: Path, ck: Checkpoint, options: DecoderOptions | str = "fp32", *, layers: int | None = None,
                   threads: int = 0, seed: int = 5) -> GraphParity:
    """Gate ``onnx_path``, a decoder of ``layers`` layers (default: the checkpoint's depth)
    built with ``options``, against the fp32 oracle of the same depth.

    ``logits`` (gated at the precision's tolerance, 1e-4): the graph's arithmetic against the
    oracle. For int4 with ``accuracy_level`` > 0 this runs the same graph with fp32
    activations (accuracy_level 0, same weight bytes), where the oracle is exact; the
    shipped level's int8 activations are gated separately (``logits_at_accuracy_level``,
    tolerance ``("decoder", "int4-activations")``), since their noise would hide a dropped
    DeepStack. ``logits_vs_unrounded_fp32`` (reported): distance to the unquantized model.
    ``golden``: the ``image`` case's inputs and oracle logits, with the tolerance the
    graph as shipped passed."""
    if isinstance(options, str):
        options = DecoderOptions(precision=options)
    onnx_path = Path(onnx_path)
    spec = DecoderSpec.from_checkpoint(ck, 1)
    layers = spec.layers if layers is None else layers
    skeleton = _reference_skeleton(ck, layers)
    cases = _cases(ck, skeleton, seed)
    del skeleton
    # The ONNX side first, freed before the reference loads.
    ours = run_onnx(onnx_path, cases, threads=threads)
    activations = options.precision == "int4" and options.accuracy_level > 0
    exact = ours
    if activations:
        twin = with_accuracy_level(onnx_path, 0)
        try:
            exact = run_onnx(twin, cases, threads=threads)
        finally:
            twin.unlink(missing_ok=True)
    if text_weight_bytes(ck, layers) <= STREAMING_THRESHOLD:
        model = load_text_reference(ck, layers)
        plain = run_reference(model, cases)
        rounded = round_like_decoder(model, options)
        oracle = run_reference(model, cases) if rounded else plain
        del model
    else:  # the slice itself does not fit in fp32: one layer at a time
        plain, oracle, rounded = run_reference_streaming(ck, layers, options, cases)
    tol = TOLERANCES[("decoder", options.precision)]
    act_tol = TOLERANCES[("decoder", "int4-activations-moe" if ck.is_moe else "int4-activations")]
    results = {}
    for name in cases:
        outs = [measure("logits", exact[name], oracle[name], tol, logits=True)]
        if activations:
            outs.append(measure(f"logits_at_accuracy_level_{options.accuracy_level}", ours[name], oracle[name], act_tol,
                                logits=True))
        if rounded:  # what the precision costs: reported, not gated
            outs.append(measure("logits_vs_unrounded_fp32", ours[name], plain[name], float("inf"), logits=True))
        results[name] = outs
    golden = _golden(cases["image"], oracle["image"])
    what = {"fp32": "fp32 weights", "fp16": "fp32 with every matrix rounded through fp16",
            "int4": f"fp32 with {rounded} matrices quantize-dequantized (block {options.block_size})"}[options.precision]
    ref = f"transformers {ck.architecture} text model, {layers} of {spec.layers} layers, {what}; KV-cache prefill + decode"
    details = {"layers_checked": layers, "layers": spec.layers, "reference_dtype": "float32", "oracle": what}
    if options.precision == "int4":
        details["accuracy_level"] = options.accuracy_level
    return GraphParity("decoder", "decoder", options.precision, ref, results, golden, details,
                       golden_tolerance=act_tol if activations else tol)


def _golden(c: _Case, logits: np.ndarray) -> dict[str, np.ndarray]:
    return {"prefill_embeds": c.embeds, "prefill_positions": c.positions, "prefill_deepstack": c.deepstack,
            "step_embeds": c.step_embeds, "step_positions": np.stack([c.step_positions(t) for t in range(DECODE_STEPS)]),
            "reference_logits": logits}


def self_golden(onnx_path: Path, golden: dict[str, np.ndarray], *, threads: int = 0) -> dict[str, np.ndarray]:
    """For a decoder gated through a truncated slice: the gate's golden inputs (its ``image``
    case) with the shipped graph's own logits at compile time (``verify`` then detects any
    later change)."""
    from ..ort.decoder_session import DecoderSession

    session = DecoderSession(Path(onnx_path), max_length=256, threads=threads)
    logits = _decode_rows(session, golden["prefill_embeds"], golden["prefill_positions"], golden["prefill_deepstack"],
                          golden["step_embeds"], golden["step_positions"])
    return {**golden, "reference_logits": logits}
