"""Config dictionaries (the ``config.json`` a checkpoint would carry) for the built-in presets.

Always explicit: ``Qwen3VLConfig()`` with no arguments is *not* the 4B model.
"""

from __future__ import annotations

import copy

from ..model.tokens import QWEN_VOCAB_SIZE, SPECIAL_TOKENS

_TOKEN_IDS = {
    "image_token_id": SPECIAL_TOKENS["<|image_pad|>"],
    "video_token_id": SPECIAL_TOKENS["<|video_pad|>"],
    "vision_start_token_id": SPECIAL_TOKENS["<|vision_start|>"],
    "vision_end_token_id": SPECIAL_TOKENS["<|vision_end|>"],
}

# Qwen3-VL-4B-Instruct's config.json, as published on the Hugging Face Hub.
QWEN3_VL_4B = {
    "architectures": ["Qwen3VLForConditionalGeneration"],
    "model_type": "qwen3_vl",
    "tie_word_embeddings": True,
    **_TOKEN_IDS,
    "text_config": {
        "model_type": "qwen3_vl_text",
        "vocab_size": QWEN_VOCAB_SIZE,
        "hidden_size": 2560,
        "intermediate_size": 9728,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "hidden_act": "silu",
        "max_position_embeddings": 262144,
        "rms_norm_eps": 1e-6,
        "attention_bias": False,
        "initializer_range": 0.02,
        "bos_token_id": SPECIAL_TOKENS["<|endoftext|>"],
        "eos_token_id": SPECIAL_TOKENS["<|im_end|>"],
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 5000000.0,
            "mrope_section": [24, 20, 20],
            "mrope_interleaved": True,
        },
        "tie_word_embeddings": True,
    },
    "vision_config": {
        "model_type": "qwen3_vl_vision",
        "depth": 24,
        "hidden_size": 1024,
        "num_heads": 16,
        "intermediate_size": 4096,
        "hidden_act": "gelu_pytorch_tanh",
        "in_channels": 3,
        "patch_size": 16,
        "temporal_patch_size": 2,
        "spatial_merge_size": 2,
        "num_position_embeddings": 2304,
        "out_hidden_size": 2560,
        "deepstack_visual_indexes": [5, 11, 17],
        "initializer_range": 0.02,
    },
}

# The embedded random test model (``tiny-random``): real token ids and vocabulary size, DeepStack levels at
# non-consecutive blocks (so an off-by-one shows), interleaved MRoPE with three
# non-empty sections, GQA, and weights initialised large (std 0.2) so positional
# bugs change outputs by O(1) instead of 1e-5 (with the usual std-0.02 initialisation the
# model is close to linear in its inputs and such bugs hide in the noise).
TINY_RANDOM = copy.deepcopy(QWEN3_VL_4B)
TINY_RANDOM["text_config"].update(
    {
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "initializer_range": 0.2,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 5000000.0,
            "mrope_section": [6, 5, 5],
            "mrope_interleaved": True,
        },
    }
)
TINY_RANDOM["vision_config"].update(
    {
        "depth": 6,
        "hidden_size": 64,
        "num_heads": 4,
        "intermediate_size": 128,
        "out_hidden_size": 128,
        "deepstack_visual_indexes": [1, 3, 4],
        "initializer_range": 0.2,
    }
)


def _shape(text: dict, vision: dict | None = None, *, tied: bool, moe: dict | None = None) -> dict:
    """An official shape: the 4B config with the published text (and vision) values."""
    cfg = copy.deepcopy(QWEN3_VL_4B)
    cfg["tie_word_embeddings"] = cfg["text_config"]["tie_word_embeddings"] = tied
    cfg["text_config"].update(text)
    cfg["vision_config"].update(vision or {})
    cfg["vision_config"]["out_hidden_size"] = cfg["text_config"]["hidden_size"]
    if moe is not None:
        cfg["architectures"] = ["Qwen3VLMoeForConditionalGeneration"]
        cfg["model_type"] = "qwen3_vl_moe"
        cfg["text_config"].update({"model_type": "qwen3_vl_moe_text", "decoder_sparse_step": 1, "mlp_only_layers": [],
                                   "norm_topk_prob": True, **moe})
        cfg["vision_config"]["model_type"] = "qwen3_vl_moe_vision"
    return cfg


# The 27-block, 1152-wide vision tower of 8B, 32B and the MoE models.
_VISION_LARGE = {"depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "deepstack_visual_indexes": [8, 16, 24]}

QWEN3_VL_2B = _shape({"hidden_size": 2048, "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
                      "intermediate_size": 6144}, tied=True)
QWEN3_VL_8B = _shape({"hidden_size": 4096, "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8,
                      "intermediate_size": 12288}, _VISION_LARGE, tied=False)
QWEN3_VL_32B = _shape({"hidden_size": 5120, "num_hidden_layers": 64, "num_attention_heads": 64, "num_key_value_heads": 8,
                       "intermediate_size": 25600}, _VISION_LARGE, tied=False)
QWEN3_VL_30B_A3B = _shape({"hidden_size": 2048, "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4,
                           "intermediate_size": 6144}, _VISION_LARGE, tied=False,
                          moe={"num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768})
QWEN3_VL_235B_A22B = _shape({"hidden_size": 4096, "num_hidden_layers": 94, "num_attention_heads": 64, "num_key_value_heads": 4,
                             "intermediate_size": 12288}, _VISION_LARGE, tied=False,
                            moe={"num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 1536})

# Every official shape, random weights (for benchmarks and reduced-depth parity). NAME:N is
# the same shape with only its first N text layers (see preset_config).
OFFICIAL = {
    "qwen3-vl-2b": QWEN3_VL_2B,
    "qwen3-vl-4b": QWEN3_VL_4B,
    "qwen3-vl-8b": QWEN3_VL_8B,
    "qwen3-vl-32b": QWEN3_VL_32B,
    "qwen3-vl-30b-a3b": QWEN3_VL_30B_A3B,
    "qwen3-vl-235b-a22b": QWEN3_VL_235B_A22B,
}
# The embedded MoE test model: the tiny shape with every layer sparse (8 experts, top-2).
TINY_MOE = _shape({k: TINY_RANDOM["text_config"][k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                       "num_attention_heads", "num_key_value_heads", "head_dim",
                                                       "initializer_range", "rope_parameters")},
                  {k: TINY_RANDOM["vision_config"][k] for k in ("depth", "hidden_size", "num_heads", "intermediate_size",
                                                         "deepstack_visual_indexes", "initializer_range")},
                  tied=True, moe={"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 64})

# The embedded trained model (``tiny``): the same architecture, started from the usual
# std-0.02 init and trained on synthetic visual questions (scripts/train_tiny.py); the
# tensors training changed ship with the package (TRAINED), the rest is rebuilt from the seed.
TINY = copy.deepcopy(TINY_RANDOM)
TINY["text_config"]["initializer_range"] = TINY["vision_config"]["initializer_range"] = 0.02

# Presets small enough to build in memory: random std-0.2 weights for parity tests, and the
# trained tiny model.
SMALL = {"tiny": TINY, "tiny-random": TINY_RANDOM, "tiny-moe": TINY_MOE}
# Trained presets: the asset file (in qwen3vl_compile/assets) holding what training changed.
TRAINED = {"tiny": "tiny_trained.safetensors"}
PRESETS = {**SMALL, **OFFICIAL}


def split_preset(name: str) -> tuple[str, int | None] | None:
    """``qwen3-vl-8b`` -> (name, None); ``qwen3-vl-8b:4`` -> (name, 4); not a preset -> None."""
    base, sep, layers = name.partition(":")
    if base not in PRESETS or (sep and base not in OFFICIAL):
        return None
    if not sep:
        return base, None
    if not layers.isdigit() or not 1 <= int(layers) <= PRESETS[base]["text_config"]["num_hidden_layers"]:
        return None
    return base, int(layers)


def is_preset(name: str) -> bool:
    return split_preset(name) is not None


def preset_config(name: str) -> dict:
    parsed = split_preset(name)
    if parsed is None:
        raise KeyError(name)
    base, layers = parsed
    cfg = copy.deepcopy(PRESETS[base])
    if layers is not None:
        cfg["text_config"]["num_hidden_layers"] = layers
    return cfg
