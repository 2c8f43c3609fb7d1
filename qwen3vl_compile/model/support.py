"""What the compiler can express, checked on ``config.json`` and the weights' headers before
any expensive work. A checkpoint outside it is refused with one line naming the config field
and its value (exit 2): never a bundle that silently computes something else.
"""

from __future__ import annotations

from ..errors import LoadError


class UnsupportedError(LoadError):
    """The checkpoint asks for something the graphs cannot express. Exit code 2."""

    exit_code = 2


_TEXT_REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
_VISION_REQUIRED = ("depth", "hidden_size", "num_heads", "intermediate_size", "patch_size", "spatial_merge_size",
                    "temporal_patch_size", "out_hidden_size", "num_position_embeddings")


def _positive_int(section: dict, name: str, field: str) -> int:
    value = section.get(field)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UnsupportedError(f"{name}.{field}: {value!r} (a positive integer is required)")
    return value


def check_config(config: dict) -> None:
    """Refuse config values outside what the vision, embedding and decoder graphs compute."""
    from ..export.moe import is_moe_layer, num_experts

    text, vision = config["text_config"], config["vision_config"]
    for field in _TEXT_REQUIRED:
        _positive_int(text, "text_config", field)
    for field in _VISION_REQUIRED:
        _positive_int(vision, "vision_config", field)
    act = text.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedError(f"text_config.hidden_act: {act!r} is not supported (the decoder computes SiLU-gated MLPs)")
    if text.get("attention_bias"):
        raise UnsupportedError("text_config.attention_bias: true is not supported (the decoder's attention has no biases)")
    if text.get("use_sliding_window"):
        raise UnsupportedError("text_config.use_sliding_window: true is not supported (full causal attention only)")
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise UnsupportedError(f"text_config rope_type: {rope_type!r} is not supported (only 'default' MRoPE)")
    if rope.get("mrope_interleaved", True) is not True:
        raise UnsupportedError(f"text_config mrope_interleaved: {rope.get('mrope_interleaved')!r} is not supported "
                               "(only Qwen3-VL's interleaved MRoPE)")
    heads, kv = text["num_attention_heads"], text.get("num_key_value_heads") or text["num_attention_heads"]
    if heads % kv:
        raise UnsupportedError(f"text_config.num_key_value_heads: {kv} does not divide num_attention_heads {heads}")
    layers = text["num_hidden_layers"]
    experts = num_experts(text)
    if experts:
        k = _positive_int(text, "text_config", "num_experts_per_tok")
        _positive_int(text, "text_config", "moe_intermediate_size")
        if k > experts:
            raise UnsupportedError(f"text_config.num_experts_per_tok: {k} is more than num_experts {experts}")
        if text.get("shared_expert_intermediate_size"):
            raise UnsupportedError(f"text_config.shared_expert_intermediate_size: {text['shared_expert_intermediate_size']} "
                                   "is not supported (Qwen3-VL MoE has no shared expert)")
    if any(not is_moe_layer(text, i) for i in range(layers)):
        _positive_int(text, "text_config", "intermediate_size")
    vision_act = vision.get("hidden_act", "gelu_pytorch_tanh")
    if vision_act not in ("gelu_pytorch_tanh", "gelu"):
        raise UnsupportedError(f"vision_config.hidden_act: {vision_act!r} is not supported")
    if vision["out_hidden_size"] != text["hidden_size"]:
        raise UnsupportedError(f"vision_config.out_hidden_size: {vision['out_hidden_size']} differs from "
                               f"text_config.hidden_size {text['hidden_size']}")
    levels = vision.get("deepstack_visual_indexes") or []
    if any(not isinstance(i, int) or not 0 <= i < vision["depth"] for i in levels):
        raise UnsupportedError(f"vision_config.deepstack_visual_indexes: {levels} (each must be a block index below "
                               f"depth {vision['depth']})")
    if len(levels) > layers:
        raise UnsupportedError(f"vision_config.deepstack_visual_indexes: {len(levels)} levels for {layers} text layers")


def text_weight_shapes(ck) -> dict[str, tuple[tuple[int, ...], ...]]:
    """Every text tensor the decoder and embedding graphs read: checkpoint suffix (under the
    text prefix; lm_head as its full key) -> the accepted shapes."""
    from .checkpoint import TEXT_PREFIXES
    from ..export.moe import is_moe_layer, num_experts

    t = ck.text_config
    H, V = t["hidden_size"], t["vocab_size"]
    heads, kv = t["num_attention_heads"], t.get("num_key_value_heads") or t["num_attention_heads"]
    hd = t.get("head_dim") or H // heads
    keys = set(ck.keys())
    need = {"embed_tokens.weight": ((V, H),), "norm.weight": ((H,),)}
    for i in range(t["num_hidden_layers"]):
        p = f"layers.{i}."
        need.update({p + "input_layernorm.weight": ((H,),), p + "post_attention_layernorm.weight": ((H,),),
                     p + "self_attn.q_proj.weight": ((heads * hd, H),), p + "self_attn.k_proj.weight": ((kv * hd, H),),
                     p + "self_attn.v_proj.weight": ((kv * hd, H),), p + "self_attn.o_proj.weight": ((H, heads * hd),),
                     p + "self_attn.q_norm.weight": ((hd,),), p + "self_attn.k_norm.weight": ((hd,),)})
        if is_moe_layer(t, i):
            E, I = num_experts(t), t["moe_intermediate_size"]
            need[p + "mlp.gate.weight"] = ((E, H),)
            if any(pre + p + "mlp.experts.0.gate_proj.weight" in keys for pre in TEXT_PREFIXES):
                for e in range(E):
                    need.update({f"{p}mlp.experts.{e}.gate_proj.weight": ((I, H),), f"{p}mlp.experts.{e}.up_proj.weight": ((I, H),),
                                 f"{p}mlp.experts.{e}.down_proj.weight": ((H, I),)})
            else:
                need[p + "mlp.experts.gate_up_proj"] = ((E, 2 * I, H), (E, H, 2 * I))
                need[p + "mlp.experts.down_proj"] = ((E, H, I), (E, I, H))
        else:
            I = t["intermediate_size"]
            need.update({p + "mlp.gate_proj.weight": ((I, H),), p + "mlp.up_proj.weight": ((I, H),),
                         p + "mlp.down_proj.weight": ((H, I),)})
    return need


def check_text_weights(ck) -> None:
    """Every text tensor present with the shape the config implies (headers only: no weight
    is read)."""
    from .checkpoint import TEXT_PREFIXES

    for suffix, shapes in text_weight_shapes(ck).items():
        key = ck.find(suffix, TEXT_PREFIXES)
        _check_shape(ck, key, shapes)
    if not ck.tie_word_embeddings:
        key = next((k for k in ("lm_head.weight", "model.lm_head.weight") if k in ck.keys()), None)
        if key is None:
            raise LoadError(f"{ck.path}: no lm_head.weight, and tie_word_embeddings is false")
        _check_shape(ck, key, ((ck.text_config["vocab_size"], ck.text_config["hidden_size"]),))


def _check_shape(ck, key: str, shapes) -> None:
    got = ck.shape(key)
    if got not in shapes:
        want = " or ".join(str(list(s)) for s in shapes)
        raise LoadError(f"{ck.path}: weight {key} has shape {list(got)}, config.json implies {want}")


def check_build_options(config: dict, precision: str, block_size: int) -> None:
    """Options that a particular checkpoint cannot take: QMoE quantizes experts in blocks
    that must divide both the hidden size and the expert size."""
    from ..errors import UsageError
    from ..export.moe import num_experts

    text = config["text_config"]
    if precision == "int4" and num_experts(text):
        for field in ("hidden_size", "moe_intermediate_size"):
            if text[field] % block_size:
                raise UsageError(f"--block-size {block_size} does not divide text_config.{field} {text[field]} "
                                 "(INT4 MoE experts are quantized in whole blocks); choose a smaller power of two")
