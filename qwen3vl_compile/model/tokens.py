"""Qwen3-VL's special tokens and their ids, as every published Qwen3-VL tokenizer has them.
Real checkpoints are read from their own files; these constants build the embedded test
tokenizer and check that a checkpoint's tokenizer agrees with its config."""

QWEN_VOCAB_SIZE = 151936  # rows of the embedding table (padded beyond the last special token)
FIRST_SPECIAL_ID = 151643

_SPECIAL_ORDER = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
SPECIAL_TOKENS = {tok: FIRST_SPECIAL_ID + i for i, tok in enumerate(_SPECIAL_ORDER)}

IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
