"""Images and videos of a chat request: ``data:`` URLs (images: PNG, JPEG, WebP; videos:
``video/mp4``, ``video/webm``, ``video/x-matroska``, ``video/quicktime``), local files only inside
``--allowed-media-dir`` (the path resolved, symlinks and ``..`` included, before the check),
``http(s)`` URLs only with ``--allow-url-fetch`` (a timeout and a size limit: ``--max-image-mb``
for images, ``--max-video-mb`` for videos). Every image is read as bytes and opened
header-first: its format and size are checked before any pixel is decoded. A video sent as
bytes (``data:`` or fetched) is written to a private temporary directory (mode 0700) that the
caller removes once the request is prepared (its sampled frames decoded), error or not: the
runtime reads a video by path, its header first (the context check) and then only the sampled
frames, seeking in the file. A local video is read in place. Videos need PyAV (the ``[video]``
extra) on the server. Mistakes are :class:`~.errors.ApiError` (400, or 413 for media over a
limit)."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import importlib
import io
import os
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from pathlib import Path

from .errors import ApiError, bad_request

FORMATS = ("PNG", "JPEG", "WEBP")
MAX_REDIRECTS = 3
FETCH_CHUNK = 64 * 1024


@dataclasses.dataclass(frozen=True)
class MediaPolicy:
    allowed_dir: Path | None = None  # resolved
    allow_url_fetch: bool = False
    max_image_bytes: int = 20 * 2**20
    max_image_pixels: int = 8192 * 8192
    url_timeout_s: float = 10.0
    max_video_bytes: int = 64 * 2**20


VIDEO_TYPES = {"video/mp4": ".mp4", "video/webm": ".webm", "video/x-matroska": ".mkv", "video/quicktime": ".mov"}


def read_image(url: str, param: str, policy: MediaPolicy):
    """The image an ``image_url`` names, as a PIL image whose header only has been read."""
    if not isinstance(url, str) or not url:
        raise bad_request("image_url.url must be a non-empty string", param)
    if url.startswith("data:"):
        data = _data_url(url, param, policy.max_image_bytes, "image",
                         "data:image/<png|jpeg|webp>;base64,<data>")
    elif url.startswith(("http://", "https://")):
        data = _fetch(url, param, policy)
    else:
        path, raw = _local_path(url, param, policy, "image", policy.max_image_bytes)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise bad_request(f"image path {raw!r} cannot be read ({e.strerror or e})", param) from None
    return open_image(data, param, policy)


def read_video(url: str, param: str, policy: MediaPolicy, tmp_dir: Path) -> Path:
    """The file of the video a ``video_url`` names: a local file in place, or bytes (``data:``
    or fetched) written to a new file in ``tmp_dir`` (the caller's private directory, which
    it removes). Only the size is checked here; the pipeline reads the header."""
    if not isinstance(url, str) or not url:
        raise bad_request("video_url.url must be a non-empty string", param)
    _require_av(param)
    if url.startswith(("http://", "https://")):
        data, suffix = _fetch(url, param, policy, "video"), Path(urllib.parse.urlparse(url).path).suffix
    elif url.startswith("data:"):
        mime = url[5:].partition(";")[0].partition(",")[0].lower()
        usage = f"data:<{'|'.join(VIDEO_TYPES)}>;base64,<data>"
        if mime not in VIDEO_TYPES:
            raise bad_request(f"a data: video URL must be {usage}, got type {mime!r}", param)
        data, suffix = _data_url(url, param, policy.max_video_bytes, "video", usage), VIDEO_TYPES[mime]
    else:
        return _local_path(url, param, policy, "video", policy.max_video_bytes)[0]
    suffix = suffix.lower() if suffix.lower() in VIDEO_TYPES.values() else ".video"
    fd, name = tempfile.mkstemp(suffix=suffix, prefix="video-", dir=tmp_dir)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return Path(name)


def _require_av(param: str) -> None:
    try:
        importlib.import_module("av")
    except ImportError:
        from ..runtime.video import INSTALL_HINT

        raise bad_request(f"this server cannot read videos: it needs PyAV, the [video] extra ({INSTALL_HINT})",
                          param, code="video_unsupported") from None


def _too_big(what: str, size: int, limit: int, param: str, kind: str = "image") -> ApiError:
    return ApiError(413, f"{what} is {size} bytes, over the limit of {limit} bytes", param=param,
                    code=f"{kind}_too_large")


def _data_url(url: str, param: str, limit: int, kind: str, usage: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise bad_request(f"a data: {kind} URL must be {usage}", param)
    # base64 holds 3 bytes per 4 characters: refuse before decoding what is surely too big.
    if len(payload) * 3 // 4 > limit + 3:
        raise _too_big(f"the data: {kind}", len(payload) * 3 // 4, limit, param, kind)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"the data: {kind} URL is not valid base64", param) from None
    if len(data) > limit:
        raise _too_big(f"the data: {kind}", len(data), limit, param, kind)
    return data


def _local_path(url: str, param: str, policy: MediaPolicy, kind: str, limit: int) -> tuple[Path, str]:
    """The resolved path of a local ``kind`` file inside the allowed directory (and the path
    as given), its size within ``limit``."""
    if policy.allowed_dir is None:
        raise bad_request(f"local {kind} paths are not served (start the server with --allowed-media-dir DIR); "
                          f"send the {kind} as a data: URL", param)
    if url.startswith("file://"):
        parsed = urllib.parse.urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise bad_request(f"file URL with a host ({parsed.netloc!r}) is not a local path", param)
        raw = urllib.parse.unquote(parsed.path)
    elif "://" in url:
        raise bad_request(f"unsupported {kind} URL scheme {url.split('://')[0]!r}: use data:, a path, or http(s)", param)
    else:
        raw = url
    if "\x00" in raw:
        raise bad_request(f"the {kind} path holds a NUL character", param)
    path = Path(os.path.realpath(policy.allowed_dir / raw))  # absolute paths replace the base; links and .. resolved
    if not path.is_relative_to(policy.allowed_dir):
        raise bad_request(f"{kind} path {raw!r} is outside the allowed media directory", param, code="path_not_allowed")
    if not path.is_file():
        raise bad_request(f"{kind} path {raw!r}: no such file in the allowed media directory", param)
    size = path.stat().st_size
    if size > limit:
        raise _too_big(f"{kind} file {raw!r}", size, limit, param, kind)
    return path, raw


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow at most :data:`MAX_REDIRECTS` redirects, and only to http(s) URLs (urllib's own
    handler would also follow one to ftp:)."""

    max_redirections = MAX_REDIRECTS

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urllib.parse.urlparse(newurl).scheme not in ("http", "https"):
            raise urllib.error.URLError(f"redirected to a non-http(s) URL ({newurl.split(':')[0]}:)")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_OPENER = urllib.request.build_opener(_HttpOnlyRedirects)


def _fetch(url: str, param: str, policy: MediaPolicy, kind: str = "image") -> bytes:
    """The bytes at an http(s) URL: connecting and each redirect bounded by ``url_timeout_s``,
    the body read within ``url_timeout_s`` in total (a server that drips bytes is cut off) and
    within ``max_image_bytes`` (``max_video_bytes`` for a video; refused from Content-Length
    when the server sends one, else while reading). Runs in a preparing thread, never in the
    event loop."""
    if not policy.allow_url_fetch:
        raise bad_request(f"http(s) {kind} URLs are not fetched (start the server with --allow-url-fetch); "
                          f"send the {kind} as a data: URL", param)
    limit = policy.max_video_bytes if kind == "video" else policy.max_image_bytes
    deadline = time.monotonic() + policy.url_timeout_s
    chunks, size = [], 0
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "qwen3vl-serve"})
        with _OPENER.open(request, timeout=policy.url_timeout_s) as response:
            length = response.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > limit:
                raise _too_big(f"the {kind} at the URL", int(length), limit, param, kind)
            while size <= limit:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                _set_read_timeout(response, left)
                chunk = response.read1(min(FETCH_CHUNK, limit + 1 - size))
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
    except ApiError:
        raise
    except urllib.error.HTTPError as e:
        raise bad_request(f"could not fetch the {kind} URL (HTTP {e.code} {e.reason})", param) from None
    except TimeoutError:  # socket.timeout: connecting, or the body past the deadline
        raise bad_request(f"could not fetch the {kind} URL (no answer within {policy.url_timeout_s:g} s)",
                          param) from None
    except Exception as e:  # URLError, timeouts, bad URLs, refused connections
        reason = getattr(e, "reason", None) or e
        raise bad_request(f"could not fetch the {kind} URL ({type(e).__name__}: {reason})", param) from None
    if size > limit:
        raise _too_big(f"the {kind} at the URL", size, limit, param, kind)
    return b"".join(chunks)


def _set_read_timeout(response, seconds: float) -> None:
    """Bound the next socket read by what is left of the fetch's deadline."""
    sock = getattr(getattr(getattr(response, "fp", None), "raw", None), "_sock", None)
    if sock is not None:
        sock.settimeout(max(seconds, 0.001))


def open_image(data: bytes, param: str, policy: MediaPolicy):
    """A PIL image of ``data`` with its header read (format and size checked); its pixels are
    decoded later, by :func:`decode`."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError as e:
        raise ApiError(413, f"the image is too large to decode ({e})", param=param, code="image_too_large") from None
    except Exception:  # UnidentifiedImageError, truncated headers, ...
        raise bad_request("the image is not a readable PNG, JPEG or WebP file", param, code="invalid_image") from None
    pixels = image.width * image.height
    if pixels > policy.max_image_pixels:
        raise ApiError(413, f"the image is {image.width}x{image.height} pixels, over the limit of "
                            f"{policy.max_image_pixels} pixels", param=param, code="image_too_large")
    return image


def decode(image, param: str):
    """Decode the pixels (EXIF orientation applied, as for image files): a truncated or damaged
    image is a 400 here."""
    from PIL import Image, ImageOps

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
            return ImageOps.exif_transpose(image)
    except Exception as e:
        raise bad_request(f"the image cannot be decoded ({type(e).__name__}: {e})", param, code="invalid_image") from None
