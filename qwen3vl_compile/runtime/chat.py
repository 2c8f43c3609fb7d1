"""Prompt building and tokenization without transformers: the bundle's ``tokenizer.json``
through the ``tokenizers`` library and its chat template through jinja2, rendered the way
Hugging Face's ``apply_chat_template`` does (sandboxed, trim/lstrip blocks, loop controls,
``raise_exception``, ``tojson``, ``strftime_now``). Each ``<|image_pad|>`` the template
emits is then expanded to the image's token count, as Qwen3VLProcessor does.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from ..errors import BundleError

IMAGE_PAD = "<|image_pad|>"


def load_chat_template(root: Path) -> str:
    root = Path(root)
    if (root / "chat_template.jinja").is_file():
        return (root / "chat_template.jinja").read_text()
    if (root / "chat_template.json").is_file():
        return json.loads((root / "chat_template.json").read_text())["chat_template"]
    cfg = root / "tokenizer_config.json"
    if cfg.is_file():
        tmpl = json.loads(cfg.read_text()).get("chat_template")
        if isinstance(tmpl, str):
            return tmpl
    raise BundleError(f"{root}: no chat template (chat_template.jinja, chat_template.json or tokenizer_config.json)")


def _environment():
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])

    def raise_exception(message):
        raise BundleError(f"chat template: {message}")

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env


class ChatFormatter:
    def __init__(self, root: Path):
        from tokenizers import Tokenizer

        root = Path(root)
        if not (root / "tokenizer.json").is_file():
            raise BundleError(f"{root}: no tokenizer.json")
        self.tokenizer = Tokenizer.from_file(str(root / "tokenizer.json"))
        self.template = _environment().from_string(load_chat_template(root))
        cfg = json.loads((root / "tokenizer_config.json").read_text()) if (root / "tokenizer_config.json").is_file() else {}
        self.special = {k: cfg.get(k) for k in ("bos_token", "eos_token", "pad_token")}
        self.image_pad_id = self.tokenizer.token_to_id(IMAGE_PAD)
        gen = json.loads((root / "generation_config.json").read_text()) if (root / "generation_config.json").is_file() else {}
        eos = gen.get("eos_token_id", [])
        eos = [eos] if isinstance(eos, int) else list(eos)
        for tok in ("<|im_end|>", "<|endoftext|>"):
            tid = self.tokenizer.token_to_id(tok)
            if tid is not None and tid not in eos:
                eos.append(tid)
        self.stop_ids = set(eos)

    def messages(self, prompt: str, num_images: int, system: str | None = None) -> list[dict]:
        content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": prompt}]
        msgs = [{"role": "system", "content": system}] if system else []
        return msgs + [{"role": "user", "content": content}]

    def render(self, messages: list[dict]) -> str:
        return self.template.render(messages=messages, add_generation_prompt=True, **{k: v for k, v in self.special.items() if v})

    def encode(self, prompt: str, image_token_counts: Iterable[int] = (), system: str | None = None) -> np.ndarray:
        """``input_ids [1, S]`` with each image's pads expanded to its token count."""
        counts = list(image_token_counts)
        text = self.render(self.messages(prompt, len(counts), system))
        pieces = text.split(IMAGE_PAD)
        if len(pieces) - 1 != len(counts):
            raise BundleError(f"chat template produced {len(pieces) - 1} image placeholders for {len(counts)} images")
        expanded = pieces[0] + "".join(IMAGE_PAD * n + rest for n, rest in zip(counts, pieces[1:]))
        ids = self.tokenizer.encode(expanded, add_special_tokens=False).ids
        return np.asarray(ids, dtype=np.int64)[None]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def stream(self) -> "StreamDecoder":
        return StreamDecoder(self.tokenizer)


class StreamDecoder:
    """Turns token ids into text pieces as they arrive; holds back incomplete UTF-8."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # a multi-byte character split across tokens: wait
            return ""
        piece = text[len(self.emitted):] if text.startswith(self.emitted) else ""
        self.emitted = text
        return piece

    def finish(self) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        piece = text[len(self.emitted):] if text.startswith(self.emitted) else ""
        self.emitted = text
        return piece


def iter_pieces(decoder: StreamDecoder, ids: Iterable[int]) -> Iterator[str]:
    for i in ids:
        piece = decoder.push(i)
        if piece:
            yield piece
    tail = decoder.finish()
    if tail:
        yield tail
