"""What the compiler can express, checked on ``config.json`` and the weights' headers before
any expensive work. A checkpoint outside it is refused with one line naming the config field
and its value (exit 2): never a bundle that silently computes something else.
"""

from __future__ import annotations

from ..errors import LoadError


class UnsupportedError(LoadError):
    """The checkpoint asks for something the graphs cannot express. Exit code 2."""

    exit_code = 2


# How a checkpoint's text_config lays out its sparse-MoE layers: read here, by the support
# checks, and by the export of the MoE blocks (``export/moe.py``).
def num_experts(text_config: dict) -> int:
    """The Hub's config.json says ``num_experts``; transformers 5's ``save_pretrained`` writes
    the same value as ``num_local_experts``."""
    return int(text_config.get("num_experts") or text_config.get("num_local_experts") or 0)


def is_moe_layer(text_config: dict, i: int) -> bool:
    """Whether decoder layer i has the sparse-MoE MLP (HF's Qwen3VLMoeTextDecoderLayer rule)."""
    if i in (text_config.get("mlp_only_layers") or []):
        return False
    return num_experts(text_config) > 0 and (i + 1) % text_config.get("decoder_sparse_step", 1) == 0


_TEXT_REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
_VISION_REQUIRED = ("depth", "hidden_size", "num_heads", "intermediate_size", "patch_size", "spatial_merge_size",
                    "temporal_patch_size", "out_hidden_size", "num_position_embeddings")


def _positive_int(section: dict, name: str, field: str) -> int:
    value = section.get(field)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UnsupportedError(f"{name}.{field}: {value!r} (a positive integer is required)")
    return value


# Sizes that may be absent (transformers then uses its default) or, for num_key_value_heads,
# null (= num_attention_heads), but never anything other than a positive integer.
_TEXT_OPTIONAL_SIZES = ("num_key_value_heads", "head_dim", "intermediate_size", "max_position_embeddings")
_VISION_OPTIONAL_SIZES = ("in_channels",)
# Flags transformers' @strict configs type as bool: "false" (a string) is not false.
_TEXT_FLAGS = ("attention_bias", "use_sliding_window", "tie_word_embeddings", "norm_topk_prob")
_TOP_FLAGS = ("tie_word_embeddings",)


def _optional_positive_int(section: dict, name: str, field: str) -> None:
    if section.get(field) is not None:
        _positive_int(section, name, field)


def _flag(section: dict, name: str, field: str) -> bool:
    value = section.get(field, False)
    if not isinstance(value, bool):
        raise UnsupportedError(f"{name}.{field}: {value!r} (true or false is required, not a {type(value).__name__})")
    return value


def _positive_number(section: dict, name: str, field: str) -> None:
    value = section.get(field)
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf")):
        raise UnsupportedError(f"{name}.{field}: {value!r} (a positive number is required)")


def _check_rope(config: dict, text: dict) -> None:
    """The text RoPE as transformers reads it (checkpoint._rope_dict): the default MRoPE only,
    interleaved, three sections that add up to head_dim/2."""
    from .checkpoint import _rope_dict

    for field in ("rope_scaling", "rope_parameters"):
        value = text.get(field)
        if value is not None and not isinstance(value, dict):
            raise UnsupportedError(f"text_config.{field}: {value!r} (an object is required)")
        top = config.get(field)
        if isinstance(top, dict) and top.get("rope_type", top.get("type", "default")) != "default":
            # transformers reads the text RoPE from text_config only: neither it nor the bundle would scale.
            raise UnsupportedError(f"config.json {field} (top level): rope_type "
                                   f"{top.get('rope_type', top.get('type'))!r} is not supported (transformers ignores it "
                                   "there; only 'default' MRoPE in text_config)")
    rope = _rope_dict(text)
    where = "text_config." + ("rope_scaling" if text.get("rope_scaling") else "rope_parameters")
    if rope["rope_type"] != "default":
        raise UnsupportedError(f"{where} rope_type: {rope['rope_type']!r} is not supported (only 'default' MRoPE)")
    if rope.get("mrope_interleaved", True) is not True:
        raise UnsupportedError(f"{where} mrope_interleaved: {rope.get('mrope_interleaved')!r} is not supported "
                               "(only Qwen3-VL's interleaved MRoPE)")
    _positive_number(rope, where, "rope_theta")
    section = rope.get("mrope_section")
    head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    if section is None:
        raise UnsupportedError(f"{where}.mrope_section is missing; Qwen3-VL needs the MRoPE sections")
    if (not isinstance(section, list) or len(section) != 3
            or any(isinstance(n, bool) or not isinstance(n, int) or n <= 0 for n in section)):
        raise UnsupportedError(f"{where}.mrope_section: {section!r} (three positive integers, for time, height and "
                               "width, are required)")
    if sum(section) != head_dim // 2:
        raise UnsupportedError(f"{where}.mrope_section: {section} sums to {sum(section)}, expected head_dim/2 = "
                               f"{head_dim // 2}")


def check_config(config: dict) -> None:
    """Refuse config values outside what the vision, embedding and decoder graphs compute,
    and values of the wrong JSON type (sizes that are not positive integers, flags that are
    not true/false), each named with its value."""

    text, vision = config["text_config"], config["vision_config"]
    for section, where, required, optional in ((text, "text_config", _TEXT_REQUIRED, _TEXT_OPTIONAL_SIZES),
                                               (vision, "vision_config", _VISION_REQUIRED, _VISION_OPTIONAL_SIZES)):
        for field in required:
            _positive_int(section, where, field)
        for field in optional:
            _optional_positive_int(section, where, field)
    for field in _TEXT_FLAGS:
        _flag(text, "text_config", field)
    for field in _TOP_FLAGS:
        _flag(config, "config", field)
    _positive_number(text, "text_config", "rms_norm_eps")
    act = text.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedError(f"text_config.hidden_act: {act!r} is not supported (the decoder computes SiLU-gated MLPs)")
    if text.get("attention_bias"):
        raise UnsupportedError("text_config.attention_bias: true is not supported (the decoder's attention has no biases)")
    if text.get("use_sliding_window"):
        raise UnsupportedError("text_config.use_sliding_window: true is not supported (full causal attention only)")
    heads, kv = text["num_attention_heads"], text.get("num_key_value_heads") or text["num_attention_heads"]
    if heads % kv:
        raise UnsupportedError(f"text_config.num_key_value_heads: {kv} does not divide num_attention_heads {heads}")
    _check_rope(config, text)
    layers = text["num_hidden_layers"]
    experts = num_experts(text)
    if experts:
        k = _positive_int(text, "text_config", "num_experts_per_tok")
        _positive_int(text, "text_config", "moe_intermediate_size")
        if "decoder_sparse_step" in text:  # every decoder_sparse_step-th layer is sparse (transformers: 1)
            _positive_int(text, "text_config", "decoder_sparse_step")
        only = text.get("mlp_only_layers")
        if only is not None and (not isinstance(only, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in only)):
            raise UnsupportedError(f"text_config.mlp_only_layers: {only!r} (a list of layer indexes is required)")
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
    levels = vision.get("deepstack_visual_indexes")
    if not isinstance(levels, list) or not levels:
        raise UnsupportedError(f"vision_config.deepstack_visual_indexes: {levels!r} (a non-empty list of vision block "
                               "indexes is required: the graphs carry at least one DeepStack level)")
    if (any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vision["depth"] for i in levels)
            or len(set(levels)) != len(levels)):
        raise UnsupportedError(f"vision_config.deepstack_visual_indexes: {levels} (each must be a distinct block index "
                               f"below depth {vision['depth']})")
    if len(levels) > layers:
        raise UnsupportedError(f"vision_config.deepstack_visual_indexes: {len(levels)} levels for {layers} text layers")


def check_generation_ids(ck) -> None:
    """generation_config.json's token ids (the runtime's stop ids among them) are integers of
    this vocabulary: ``eos_token_id`` an id or a list of ids, ``bos``/``pad`` an id or null."""
    gen, vocab = ck.generation_config, ck.text_config["vocab_size"]

    def bad(field, value):
        raise UnsupportedError(f"generation_config.json {field}: {value!r} (a token id, an integer in 0..{vocab - 1}, "
                               f"{'or a list of them ' if field == 'eos_token_id' else ''}is required)")

    def is_id(v):
        return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < vocab

    for field in ("eos_token_id", "bos_token_id", "pad_token_id"):
        value = gen.get(field)
        if value is None:
            continue
        if field == "eos_token_id" and isinstance(value, list):
            if not value or not all(map(is_id, value)):
                bad(field, value)
        elif not is_id(value):
            bad(field, value)


def text_weight_shapes(ck) -> dict[str, tuple[tuple[int, ...], ...]]:
    """Every text tensor the decoder and embedding graphs read: checkpoint suffix (under the
    text prefix; lm_head as its full key) -> the accepted shapes."""
    from .checkpoint import TEXT_PREFIXES

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


def vision_weight_shapes(ck) -> dict[str, tuple[int, ...]]:
    """Every vision tensor Qwen3VLVisionModel holds (suffix under the vision prefix) -> its
    shape, from the vision config."""
    v = ck.vision_config
    H, inter, depth, out = v["hidden_size"], v["intermediate_size"], v["depth"], v["out_hidden_size"]
    merged = H * v["spatial_merge_size"] ** 2
    need = {"patch_embed.proj.weight": (H, v.get("in_channels") or 3, v["temporal_patch_size"], v["patch_size"], v["patch_size"]),
            "patch_embed.proj.bias": (H,), "pos_embed.weight": (v["num_position_embeddings"], H),
            "merger.norm.weight": (H,), "merger.norm.bias": (H,)}
    for i in range(depth):
        p = f"blocks.{i}."
        need.update({p + "norm1.weight": (H,), p + "norm1.bias": (H,), p + "norm2.weight": (H,), p + "norm2.bias": (H,),
                     p + "attn.qkv.weight": (3 * H, H), p + "attn.qkv.bias": (3 * H,), p + "attn.proj.weight": (H, H),
                     p + "attn.proj.bias": (H,), p + "mlp.linear_fc1.weight": (inter, H), p + "mlp.linear_fc1.bias": (inter,),
                     p + "mlp.linear_fc2.weight": (H, inter), p + "mlp.linear_fc2.bias": (H,)})
    mergers = ["merger."] + [f"deepstack_merger_list.{j}." for j in range(len(v["deepstack_visual_indexes"]))]
    for p in mergers:
        need.update({p + "linear_fc1.weight": (merged, merged), p + "linear_fc1.bias": (merged,),
                     p + "linear_fc2.weight": (out, merged), p + "linear_fc2.bias": (out,)})
        if p != "merger.":  # DeepStack mergers normalise after the 2x2 shuffle
            need.update({p + "norm.weight": (merged,), p + "norm.bias": (merged,)})
    return need


def check_text_weights(ck) -> None:
    """Every text tensor present with the shape the config implies and a float dtype (headers
    only: no weight is read)."""
    from .checkpoint import TEXT_PREFIXES

    for suffix, shapes in text_weight_shapes(ck).items():
        key = ck.find(suffix, TEXT_PREFIXES)
        _check_shape(ck, key, shapes)
    if not ck.tie_word_embeddings:
        key = next((k for k in ("lm_head.weight", "model.lm_head.weight") if k in ck.keys()), None)
        if key is None:
            raise LoadError(f"{ck.path}: no lm_head.weight, and tie_word_embeddings is false")
        _check_shape(ck, key, ((ck.text_config["vocab_size"], ck.text_config["hidden_size"]),))


def check_vision_weights(ck) -> None:
    """Every vision tensor present with the shape the vision config implies and a float dtype
    (headers only)."""
    from .checkpoint import VISION_PREFIXES

    for suffix, shape in vision_weight_shapes(ck).items():
        _check_shape(ck, ck.find(suffix, VISION_PREFIXES), (shape,))


# The safetensors dtypes the graphs take weights in; integer or bool tensors would be cast
# to float silently (a quantized or corrupted checkpoint), so they are refused.
FLOAT_DTYPES = ("F32", "F16", "BF16")


def _check_shape(ck, key: str, shapes) -> None:
    got = ck.shape(key)
    if got not in shapes:
        want = " or ".join(str(list(s)) for s in shapes)
        raise LoadError(f"{ck.path}: weight {key} has shape {list(got)}, config.json implies {want}")
    dtype = ck.dtype(key)
    if dtype not in FLOAT_DTYPES:
        raise UnsupportedError(f"{ck.path}: weight {key} is stored as {dtype}; only float weights "
                               f"({', '.join(FLOAT_DTYPES)}) are supported")


def check_build_options(config: dict, precision: str, block_size: int) -> None:
    """Options that a particular checkpoint cannot take: QMoE quantizes experts in blocks
    that must divide both the hidden size and the expert size."""
    from ..errors import UsageError

    text = config["text_config"]
    if precision == "int4" and num_experts(text):
        for field in ("hidden_size", "moe_intermediate_size"):
            if text[field] % block_size:
                raise UsageError(f"--block-size {block_size} does not divide text_config.{field} {text[field]} "
                                 "(INT4 MoE experts are quantized in whole blocks); choose a smaller power of two")
