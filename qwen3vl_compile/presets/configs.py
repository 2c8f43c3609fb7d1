"""Config dictionaries (the ``config.json`` a checkpoint would carry) for the built-in presets.

Always explicit: ``Qwen3VLConfig()`` with no arguments is *not* the 4B model.
"""

from __future__ import annotations

import copy

from ..tokens import QWEN_VOCAB_SIZE, SPECIAL_TOKENS

_TOKEN_IDS = {
    "image_token_id": SPECIAL_TOKENS["<|image_pad|>"],
    "video_token_id": SPECIAL_TOKENS["<|video_pad|>"],
    "vision_start_token_id": SPECIAL_TOKENS["<|vision_start|>"],
    "vision_end_token_id": SPECIAL_TOKENS["<|vision_end|>"],
}

# Qwen3-VL-4B-Instruct, as published (REFERENCE section 1).
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

# The embedded test model: real token ids and vocabulary size, DeepStack levels at
# non-consecutive blocks (so an off-by-one shows), interleaved MRoPE with three
# non-empty sections, GQA, and weights initialised large (std 0.2) so positional
# bugs change outputs by O(1) instead of 1e-5 (REFERENCE section 5).
TINY = copy.deepcopy(QWEN3_VL_4B)
TINY["text_config"].update(
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
TINY["vision_config"].update(
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

PRESETS = {"tiny": TINY, "qwen3-vl-4b": QWEN3_VL_4B}


def preset_config(name: str) -> dict:
    return copy.deepcopy(PRESETS[name])
