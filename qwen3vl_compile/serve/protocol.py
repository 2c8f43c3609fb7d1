"""The ``POST /v1/chat/completions`` body, checked field by field into a :class:`ChatRequest`
(every mistake a 400, or 404 for an unknown model, naming the field), and the stop-string
matcher that trims a streamed answer at the first stop string."""

from __future__ import annotations

import dataclasses
import math
import numbers

from .errors import ApiError, bad_request

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOPS = 4


@dataclasses.dataclass
class ImageRef:
    url: str
    param: str


@dataclasses.dataclass
class VideoRef:
    url: str
    param: str


# A content part type -> what it becomes in the Pipeline's messages and the reference it holds.
MEDIA_PARTS = {"image_url": ("image", ImageRef), "video_url": ("video", VideoRef)}


@dataclasses.dataclass
class ChatRequest:
    messages: list[dict]  # the Pipeline's form, image / video parts holding ImageRef / VideoRef until resolved
    images: list[ImageRef]
    max_tokens: int | None
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: list[str]
    stream: bool
    include_usage: bool
    videos: list[VideoRef] = dataclasses.field(default_factory=list)


def _number(body: dict, name: str, default, lo: float, hi: float, *, lo_open: bool = False):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise bad_request(f"{name} must be a number, got {value!r}", name)
    if value < lo or value > hi or (lo_open and value == lo):
        raise bad_request(f"{name} must be in {'(' if lo_open else '['}{lo}, {hi}], got {value}", name)
    return float(value)


def _integer(body: dict, name: str, lo: int | None = None):
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"{name} must be an integer, got {value!r}", name)
    if lo is not None and value < lo:
        raise bad_request(f"{name} must be >= {lo}, got {value}", name)
    return value


def parse_chat_request(body, model_names: tuple[str, ...]) -> ChatRequest:
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(body).__name__}")
    model = body.get("model")
    if model is not None and model not in model_names:
        raise ApiError(404, f"the model {model!r} does not exist; this server serves {model_names[0]!r}",
                       param="model", code="model_not_found")
    n = _integer(body, "n")
    if n is not None and n != 1:
        raise bad_request(f"n must be 1 (one choice per request), got {n}", "n")
    for name in ("tools", "functions"):
        if body.get(name):
            raise bad_request(f"{name} are not supported by this server", name)
    if body.get("logprobs"):
        raise bad_request("logprobs are not supported by this server", "logprobs")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise bad_request("response_format: only {'type': 'text'} is supported", "response_format")
    for name in ("frequency_penalty", "presence_penalty"):
        if _number(body, name, 0.0, -2.0, 2.0) != 0:
            raise bad_request(f"{name} is not supported by this server (give 0 or leave it out)", name)
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise bad_request(f"stream must be true or false, got {stream!r}", "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict):
            raise bad_request("stream_options must be an object", "stream_options")
        if not stream:
            raise bad_request("stream_options is only allowed with stream: true", "stream_options")
        include_usage = options.get("include_usage", False)
        if not isinstance(include_usage, bool):
            raise bad_request("stream_options.include_usage must be true or false", "stream_options.include_usage")
    max_tokens = _integer(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", 1)
    top_k = _integer(body, "top_k", -1)
    seed = _integer(body, "seed")
    stop = body.get("stop")
    if stop is None:
        stops = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = list(stop)
    else:
        raise bad_request("stop must be a string or a list of strings", "stop")
    if len(stops) > MAX_STOPS or any(not s for s in stops):
        raise bad_request(f"stop takes at most {MAX_STOPS} non-empty strings", "stop")
    messages, images, videos = _messages(body.get("messages"))
    return ChatRequest(
        messages=messages, images=images, videos=videos, max_tokens=max_tokens,
        temperature=_number(body, "temperature", 0.0, 0.0, 2.0),  # greedy by default, as qwen3vl-run
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        top_k=0 if top_k in (None, -1) else top_k,
        seed=None if seed is None else seed % 2**63,
        stop=stops, stream=bool(stream), include_usage=include_usage,
    )


def _messages(messages) -> tuple[list[dict], list[ImageRef], list[VideoRef]]:
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list", "messages")
    out, images, videos = [], [], []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad_request(f"{where} must be an object with role and content", where)
        role = message.get("role")
        if role not in ROLES:
            raise bad_request(f"{where}.role {role!r} is not supported (system, developer, user, assistant)",
                              f"{where}.role")
        role = ROLES[role]
        content = message.get("content")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise bad_request(f"{where}.content must be a string or a list of content parts", f"{where}.content")
        parts = []
        for j, part in enumerate(content):
            at = f"{where}.content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise bad_request(f"{at}.text must be a string", f"{at}.text")
                parts.append({"type": "text", "text": part["text"]})
            elif kind in MEDIA_PARTS:
                media, ref_type = MEDIA_PARTS[kind]
                refs = images if media == "image" else videos
                if role != "user":
                    raise bad_request(f"{at}: {media}s are only allowed in user messages", f"{at}.type")
                ref = part.get(kind)
                url = ref.get("url") if isinstance(ref, dict) else ref
                if not isinstance(url, str) or not url:
                    raise bad_request(f"{at}.{kind}.url must be a non-empty string", f"{at}.{kind}")
                refs.append(ref_type(url, f"{at}.{kind}"))
                parts.append({"type": media, media: refs[-1]})
            else:
                raise bad_request(f"{at}.type {kind!r} is not supported (text, image_url, video_url)", f"{at}.type",
                                  code="unsupported_content_type")
        out.append({"role": role, "content": parts})
    return out, images, videos


class StopMatcher:
    """Text in, text out, cut at the first stop string: text that could be the start of a stop
    string is held back until the next piece decides."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.buffer = ""
        self.stopped = False

    def push(self, piece: str) -> str:
        """The text that is now final; :attr:`stopped` once a stop string was seen."""
        if self.stopped:
            return ""
        if not self.stops:
            return piece
        self.buffer += piece
        cut = min((i for i in (self.buffer.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            out, self.buffer = self.buffer[:cut], ""
            return out
        keep = self.hold
        out = self.buffer[:-keep] if keep else self.buffer
        self.buffer = self.buffer[len(out):]
        return out

    def flush(self) -> str:
        out, self.buffer = ("" if self.stopped else self.buffer), ""
        return out
