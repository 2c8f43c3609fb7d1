"""An offline tokenizer with Qwen's layout, for the embedded model (no download needed).

A small byte-level BPE is trained on a built-in text with Qwen's pre-tokenizer split; the
vocabulary is padded with unreachable entries up to id 151643 so that the special tokens
land on their real ids (``<|image_pad|>`` = 151655, ...). Deterministic: same files every time.
"""

from __future__ import annotations

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from ..model.tokens import FIRST_SPECIAL_ID, SPECIAL_TOKENS

# Qwen2's pre-tokenizer split (contractions, letters, single digits, punctuation, newlines, spaces).
QWEN_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# A chat template in Qwen's ChatML format with Qwen3-VL's image/video placeholders. Real
# checkpoints bring their own template; this one is written for the embedded model.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}"
    "{{- message['content'] }}"
    "{%- else %}"
    "{%- for item in message['content'] %}"
    "{%- if item['type'] == 'image' or 'image' in item %}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif item['type'] == 'video' or 'video' in item %}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif item['type'] == 'text' %}"
    "{{- item['text'] }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

_CORPUS = [
    "Describe this image. What is in the picture? The photo shows a cat sitting on a red chair.",
    "A small dog runs across the green field while two children play with a blue ball.",
    "The quick brown fox jumps over the lazy dog. Numbers like 12, 345 and 6789 appear too.",
    "You are a helpful assistant. Answer the question about the image in one sentence.",
    "There are three apples, a banana and an orange on the wooden table near the window.",
    "The chart compares revenue in 2023 and 2024; sales grew by 15 percent in the north.",
    "A street at night: cars, lights, people walking, a bus stop and a tall building.",
    "Read the text in the image and translate it into English, then summarise it briefly.",
    "Mountains covered with snow rise above a lake; the sky is clear and bright blue.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n",
]


def build_tokenizer(vocab_size_trained: int = 1024) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size_trained,
        min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)

    # Pad the vocabulary to the first special id with entries no input can produce:
    # they contain a character outside the byte-level alphabet and no merge builds them.
    model = tok.model
    vocab = dict(sorted(tok.get_vocab().items(), key=lambda kv: kv[1]))
    merges = _merges_of(tok)
    next_id = len(vocab)
    while next_id < FIRST_SPECIAL_ID:
        vocab[f"\u2402unused{next_id}"] = next_id
        next_id += 1
    del model
    tok.model = models.BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False, byte_fallback=False)
    special = sorted(SPECIAL_TOKENS.items(), key=lambda kv: kv[1])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, _ in special])
    for t, i in special:
        got = tok.token_to_id(t)
        if got != i:  # pragma: no cover - construction invariant
            raise AssertionError(f"special token {t} landed on {got}, expected {i}")
    return tok


def _merges_of(tok: Tokenizer) -> list[tuple[str, str]]:
    import json

    data = json.loads(tok.to_str())
    merges = data["model"]["merges"]
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]
