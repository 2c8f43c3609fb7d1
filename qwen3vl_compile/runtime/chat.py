"""Prompt building and tokenization without transformers.

The bundle's ``tokenizer.json`` is loaded with the ``tokenizers`` library and its chat
template rendered with jinja2 the way Hugging Face's ``apply_chat_template`` does: a sandboxed
environment with ``trim_blocks`` / ``lstrip_blocks``, loop controls, a pass-through
``{% generation %}`` tag, ``raise_exception``, ``strftime_now``, a JSON ``tojson``, and the
named special tokens (``eos_token``, ...) as variables. Each ``<|image_pad|>`` the template
emits is then expanded to ``t*h*w / merge**2`` pads, in image order, and the text tokenized
as one string, as Qwen3VLProcessor does; ``mm_token_type_ids`` marks image pads 1 and video
pads 2.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from ..errors import BundleError, RuntimeInputError
from .rope_index import mm_token_types

IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
# Chat-format stop tokens of every Qwen checkpoint, added to generation_config's eos ids.
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _files(source) -> "BundleFiles":
    """A checkpoint directory (every file in it) or a bundle's :class:`BundleFiles` (only
    the files its manifest lists)."""
    from ..bundle.manifest import BundleFiles

    return source if isinstance(source, BundleFiles) else BundleFiles.directory(Path(source))


def _read_json(path: Path | None) -> dict:
    """A JSON object file; ``{}`` when ``path`` is None (not there, or not listed)."""
    if path is None:
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BundleError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(value, dict):
        raise BundleError(f"{path}: not a JSON object")
    return value


def load_chat_template(source) -> str:
    """The chat template: ``chat_template.jinja``, else ``chat_template.json``
    (``{"chat_template": ...}``), else ``tokenizer_config.json``'s ``chat_template`` (a string,
    or a list of named templates of which ``default`` is used). ``source``: a checkpoint
    directory or a bundle's :class:`BundleFiles` (a file its manifest does not list is not
    looked at)."""
    files = _files(source)
    jinja = files.find("chat_template.jinja")
    if jinja is not None:
        return jinja.read_text(encoding="utf-8")
    for name in ("chat_template.json", "tokenizer_config.json"):
        tmpl = _read_json(files.find(name)).get("chat_template")
        if isinstance(tmpl, list):
            tmpl = next((t.get("template") for t in tmpl if isinstance(t, dict) and t.get("name") == "default"), None)
        if isinstance(tmpl, str):
            return tmpl
    raise BundleError(f"{files.root}: no chat template (chat_template.jinja, chat_template.json or tokenizer_config.json)")


def _environment():
    """A jinja2 environment configured like Hugging Face's chat-template compiler."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` (assistant-mask markers) rendered as its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class Namespace(jinja2.utils.Namespace):
        """``namespace()`` that refuses underscore attributes, like Hugging Face's."""

        def __init__(*args, **kwargs):
            self, attrs = args[0], dict(*args[1:], **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat template: namespace attribute {name!r} is not allowed")

    class TemplateDict:
        """``dict(...)`` and ``dict.fromkeys(...)`` without exposing the type itself."""

        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    def raise_exception(message):
        raise BundleError(f"chat template: {message}")

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters; Hugging Face's (and so ours) does not.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = Namespace
    return env


def build_messages(prompt: str, num_images: int, system: str | None = None, num_videos: int = 0) -> list[dict]:
    """``[system?, user: [image x num_images, video x num_videos, text]]``, the media before the text."""
    content = ([{"type": "image"} for _ in range(num_images)] + [{"type": "video"} for _ in range(num_videos)]
               + [{"type": "text", "text": prompt}])
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]


ROLES = ("system", "user", "assistant")


MEDIA = ("image", "video")


def template_messages(messages) -> tuple[list[tuple[str, object]], list[dict]]:
    """A conversation ``[{"role": "system" | "user" | "assistant", "content": str | [parts]}]``
    with parts ``{"type": "text", "text": str}``, ``{"type": "image", "image": <a path, PIL
    image or array>}`` and ``{"type": "video", "video": <a path or a Video>}`` -> ``(media in
    prompt order as (kind, value) pairs, the messages as the chat template takes them)``: each
    media part becomes ``{"type": "image"}`` / ``{"type": "video"}``. Anything else is refused,
    naming where."""
    if isinstance(messages, (str, bytes, dict)) or not isinstance(messages, (list, tuple)) or not messages:
        raise RuntimeInputError(f"messages must be a non-empty list of {{'role': ..., 'content': ...}} dicts, "
                                f"got {type(messages).__name__ if messages else 'an empty list'}")
    images, out = [], []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise RuntimeInputError(f"{where} must be a dict with 'role' and 'content', got {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise RuntimeInputError(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}")
        if isinstance(content, str):
            _check_text(content, f"{where}.content")
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, (list, tuple)):
            raise RuntimeInputError(f"{where}.content must be a string or a list of parts, got {type(content).__name__}")
        parts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                _check_text(part["text"], f"{where}.content[{j}].text")
                parts.append({"type": "text", "text": part["text"]})
            elif kind in MEDIA and kind in part:
                if role != "user":
                    raise RuntimeInputError(f"{where}.content[{j}]: {kind}s belong in user messages, not {role}")
                images.append((kind, part[kind]))
                parts.append({"type": kind})
            else:
                raise RuntimeInputError(f"{where}.content[{j}] must be {{'type': 'text', 'text': str}}, "
                                        f"{{'type': 'image', 'image': ...}} or {{'type': 'video', 'video': ...}}, "
                                        f"got {_short(part)}")
        out.append({"role": role, "content": parts})
    return images, out


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _check_text(text: str, name: str) -> None:
    from .pipeline import check_text

    check_text(text, name)


def check_no_pads(text: str, name: str) -> None:
    if IMAGE_PAD in text or VIDEO_PAD in text:
        raise RuntimeInputError(f"{name} contains a literal {IMAGE_PAD} or {VIDEO_PAD}; remove it")


def image_token_count(grid_thw: Sequence[int], merge_size: int) -> int:
    """Pad tokens one image takes: ``t*h*w / merge**2`` (Qwen3VLProcessor.replace_image_token)."""
    t, h, w = (int(v) for v in grid_thw)
    return t * h * w // merge_size**2


def expand_image_pads(text: str, counts: Sequence[int]) -> str:
    """Replace the i-th ``<|image_pad|>`` with ``counts[i]`` of them."""
    pieces = text.split(IMAGE_PAD)
    if len(pieces) - 1 != len(counts):
        raise RuntimeInputError(f"the prompt holds {len(pieces) - 1} image placeholders for {len(counts)} images")
    return pieces[0] + "".join(IMAGE_PAD * int(n) + rest for n, rest in zip(counts, pieces[1:]))


@dataclasses.dataclass(frozen=True)
class PromptInputs:
    """Token ids of a prompt and their modality types (0 text, 1 image pad, 2 video pad)."""

    input_ids: np.ndarray  # [1, S] int64
    mm_token_type_ids: np.ndarray  # [1, S] int64


class ChatFormatter:
    """Chat template + tokenizer of a checkpoint directory, or of a bundle (``root``: its
    :class:`~qwen3vl_compile.bundle.manifest.BundleFiles`, so that only files its manifest
    lists are read)."""

    def __init__(self, root):
        from tokenizers import Tokenizer

        files = _files(root)
        path = files.find("tokenizer.json")
        if path is None:
            raise BundleError(f"{files.root}: no tokenizer.json")
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers library raises a bare Exception
            raise BundleError(f"{path}: not a readable tokenizer ({e})") from None
        try:
            self.template = _environment().from_string(load_chat_template(files))
        except Exception as e:  # jinja2.TemplateSyntaxError
            if isinstance(e, BundleError):
                raise
            where = f" at line {e.lineno}: {e.message}" if getattr(e, "lineno", None) else f" ({e})"
            raise BundleError(f"{files.root}: the chat template has a syntax error{where}") from None
        config = _read_json(files.find("tokenizer_config.json"))
        self.special_tokens = {k: _token_text(config[k]) for k in SPECIAL_TOKEN_NAMES if config.get(k) is not None}
        self.image_pad_id = self._require_id(IMAGE_PAD)
        self.video_pad_id = self._require_id(VIDEO_PAD)
        self.stop_ids = frozenset(stop_token_ids(files, self.tokenizer))

    def _require_id(self, token: str) -> int:
        tid = self.tokenizer.token_to_id(token)
        if tid is None:
            raise BundleError(f"tokenizer has no {token} token: not a Qwen3-VL tokenizer")
        return tid

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The template's text, rendered with the variables ``apply_chat_template`` passes."""
        return self.template.render(
            messages=messages, tools=None, documents=None, add_generation_prompt=add_generation_prompt, **self.special_tokens
        )

    def build_inputs(
        self, prompt: str, image_grids: Iterable[Sequence[int]] = (), system: str | None = None, *, merge_size: int = 2
    ) -> PromptInputs:
        """``input_ids`` and ``mm_token_type_ids`` for a prompt about images of these grids."""
        counts = [image_token_count(g, merge_size) for g in image_grids]
        ids = self.encode(prompt, counts, system)
        return PromptInputs(ids, mm_token_types(ids, image_token_id=self.image_pad_id, video_token_id=self.video_pad_id))

    def encode(self, prompt: str, image_token_counts: Iterable[int] = (), system: str | None = None) -> np.ndarray:
        """``input_ids [1, S]`` int64, each image's pad expanded to its token count."""
        counts = list(image_token_counts)
        for name, text in (("prompt", prompt), ("system prompt", system or "")):
            check_no_pads(text, f"the {name}")
        return self._tokenize(self.render(build_messages(prompt, len(counts), system)), counts)

    def encode_messages(self, messages: list[dict], image_token_counts: Iterable[int] = (), videos: Sequence = ()
                        ) -> np.ndarray:
        """``input_ids [1, S]`` of a multi-turn conversation in the template's form (see
        :func:`template_messages`: images as ``{"type": "image"}`` parts, in order), each
        image's pad expanded to its token count, as :meth:`encode` does for one prompt, and
        each video's pad to its timestamped groups (``videos``: its plans or processed videos,
        see :func:`~.video.expand_video_pads`)."""
        for i, message in enumerate(messages):
            content = message["content"]
            texts = [content] if isinstance(content, str) else [p.get("text", "") for p in content]
            for text in texts:
                check_no_pads(text, f"message {i} ({message['role']})")
        return self._tokenize(self.render(messages), list(image_token_counts), videos)

    def _tokenize(self, rendered: str, counts: list[int], videos: Sequence = ()) -> np.ndarray:
        from .video import expand_video_pads

        text = expand_video_pads(expand_image_pads(rendered, counts), videos)
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return np.asarray(ids, dtype=np.int64)[None]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of generated ids, special tokens skipped."""
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def stream(self) -> "StreamDecoder":
        return StreamDecoder(self.tokenizer)


def _token_text(value) -> str:
    """A special token from tokenizer_config.json: a string or a serialized AddedToken."""
    return value["content"] if isinstance(value, dict) else str(value)


def stop_token_ids(root, tokenizer) -> set[int]:
    """``generation_config.json``'s ``eos_token_id`` (int or list) plus <|im_end|> and <|endoftext|>."""
    eos = _read_json(_files(root).find("generation_config.json")).get("eos_token_id", [])
    ids = {int(eos)} if isinstance(eos, int) else {int(i) for i in eos or []}
    ids.update(tid for tid in map(tokenizer.token_to_id, STOP_TOKENS) if tid is not None)
    return ids


class StreamDecoder:
    """Text pieces as token ids arrive, equal in sum to decoding the whole sequence.

    Decodes a short window: the ids since the last emitted piece plus the ones before it
    as context, and emits the new text once it does not end in U+FFFD, i.e. once a UTF-8
    character split across byte-level tokens is complete. Cost per token stays constant.
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # start of the context window
        self.read = 0  # ids before this are emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one id; return the text that became final ("" while a character is incomplete)."""
        self.ids.append(int(token_id))
        return self._advance(final=False)

    def finish(self) -> str:
        """Whatever is still held back (an incomplete character decodes to U+FFFD, as in a whole decode)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        before = self._decode(self.ids[self.prefix : self.read])
        text = self._decode(self.ids[self.prefix :])
        if len(text) <= len(before) or (text.endswith("\ufffd") and not final):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(before) :]


def iter_pieces(decoder: StreamDecoder, ids: Iterable[int]) -> Iterator[str]:
    """Feed ids through ``decoder``, yielding non-empty pieces, the held-back tail last."""
    for i in ids:
        piece = decoder.push(i)
        if piece:
            yield piece
    tail = decoder.finish()
    if tail:
        yield tail
