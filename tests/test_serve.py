"""``qwen3vl-serve`` as a real server process on a free loopback port, driven by OpenAI's own
Python client: plain and streamed completions, multi-turn with images, the same greedy text as
``Pipeline`` for the same messages, the same answer alone or among concurrent requests, every
client mistake as OpenAI's error shape with its status (and the server keeps serving), a client
that disconnects mid-stream frees its slot, SIGTERM finishes the request in flight. Videos
(``video_url`` parts, with PyAV): as a data: URL and by allowed path the same greedy text as
``Pipeline`` on the same file, alone and with an image; corrupt, audio-only, too big and too long
videos are OpenAI errors (and their temporary files removed); a server without PyAV says which
extra it needs.

Every server is started by a fixture with a bounded wait for /health and always stopped
(SIGTERM, then SIGKILL); every request loop is bounded in count and time."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest

starlette = pytest.importorskip("starlette", reason="the [serve] extra (starlette, uvicorn) is not installed")
pytest.importorskip("uvicorn", reason="the [serve] extra (starlette, uvicorn) is not installed")
openai = pytest.importorskip("openai", reason="the openai client (the [test] extra) is not installed")
httpx = pytest.importorskip("httpx", reason="httpx (the [test] extra) is not installed")

from PIL import Image  # noqa: E402

from qwen3vl_compile import Pipeline  # noqa: E402

KEY = "test-key"
START_TIMEOUT = 90
ROOT = Path(__file__).resolve().parent.parent


sys.path.insert(0, str(ROOT / "benchmarks"))
import serve_load  # noqa: E402  (the one launcher of a real server process, shared with the load run)
from clips import write_clip  # noqa: E402


def ServerProcess(bundle, args, log_path: Path, api_key: str | None = None) -> "serve_load.Server":
    """``qwen3vl-serve`` on a free loopback port, one thread, quiet logs; bounded start."""
    return serve_load.Server(bundle, ["--threads", 1, "--log-level", "warning", *args], log_path,
                             start_timeout=START_TIMEOUT, api_key=api_key, client_timeout=120)


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    _png(224, 224, seed=5, path=d / "inside.png")
    if _HAVE_AV:
        _clip_file(d / "clip.mkv")
        with open(d / "huge.mp4", "wb") as f:  # sparse: over --max-video-mb from its size alone
            f.truncate(2 * 2**20)
    outside = tmp_path_factory.mktemp("outside")
    _png(224, 224, seed=6, path=outside / "secret.png")
    (d / "link.png").symlink_to(outside / "secret.png")
    return d


@pytest.fixture(scope="module")
def server(vision_bundle, media_dir, tmp_path_factory):
    """The main server: 4 slots, an API key, images and videos from ``media_dir``, videos up to
    1 MiB; its temporary files in ``srv.tmp_dir``."""
    tmp_dir, saved = tmp_path_factory.mktemp("server-tmp"), os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(tmp_dir)
    try:
        srv = ServerProcess(vision_bundle, ["--max-batch", 4, "--max-waiting", 8, "--allowed-media-dir", media_dir,
                                            "--max-video-mb", 1],
                            tmp_path_factory.mktemp("log") / "server.log", api_key=KEY)
    finally:
        os.environ.pop("TMPDIR") if saved is None else os.environ.update(TMPDIR=saved)
    srv.tmp_dir = tmp_dir
    try:
        yield srv
    finally:
        rc = srv.stop()
        log = srv.log()
        assert "Traceback" not in log, log
        assert rc == 0, log


@pytest.fixture(scope="module")
def small_server(vision_bundle, tmp_path_factory):
    """One slot, nobody may wait, a 64 KiB body and 16 KiB images: the limits."""
    srv = ServerProcess(vision_bundle, ["--max-batch", 1, "--max-waiting", 0, "--max-body-mb", 1 / 16,
                                        "--max-image-mb", 1 / 64],
                        tmp_path_factory.mktemp("log") / "small.log")
    try:
        yield srv
    finally:
        srv.stop()
        log = srv.log()
        assert "Traceback" not in log, log


@pytest.fixture(scope="module")
def pipe(vision_bundle):
    with Pipeline.load(vision_bundle, max_batch=1) as p:
        yield p


def _png(w, h, seed=0, path=None, fmt="PNG") -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    if path is not None:
        Path(path).write_bytes(buf.getvalue())
    return buf.getvalue()


def _data_url(data: bytes, mime="image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def _user(text, *urls) -> dict:
    return {"role": "user", "content": [*map(_image_part, urls), {"type": "text", "text": text}]}


def _ask(client, messages, max_tokens=12, **kw):
    return client.chat.completions.create(model="tiny-random", messages=messages, max_tokens=max_tokens,
                                          temperature=0, **kw)


try:
    import av

    _HAVE_AV = True
except ImportError:
    _HAVE_AV = False
needs_av = pytest.mark.skipif(not _HAVE_AV, reason="PyAV (the [video] extra) is not installed")


def _clip_file(path) -> None:
    """8 lossless frames of 224x224 at 4 fps (4 sampled: the 224 bucket): a moving gradient and
    square, 170 KB."""
    y, x = np.mgrid[0:224, 0:224]
    frames = []
    for i in range(8):
        f = np.stack([(x + 8 * i) % 256, (y * 2) % 256, ((x + y) // 2 + 16 * i) % 256], -1).astype(np.uint8)
        f[40 + 8 * i:100 + 8 * i, 60:120] = [250, 30, 30]
        frames.append(f)
    write_clip(path, frames, 4)


def _video_part(url: str) -> dict:
    return {"type": "video_url", "video_url": {"url": url}}


IMG_A = _data_url(_png(224, 224, seed=1))
IMG_B = _data_url(_png(256, 256, seed=2, fmt="JPEG"), "image/jpeg")
IMG_W = _data_url(_png(224, 224, seed=3, fmt="WEBP"), "image/webp")


# -- completions ----------------------------------------------------------------------------------

def test_models_and_health(server):
    models = server.client().models.list().data
    assert [m.id for m in models] == ["tiny-random"]
    assert models[0].model_extra["context_length"] == 8192
    assert httpx.get(server.url + "/health", timeout=10).json()["status"] == "ok"


def test_plain_and_streamed_completion_agree(server):
    client = server.client()
    messages = [_user("Describe this image", IMG_A)]
    plain = _ask(client, messages)
    choice = plain.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length" and plain.usage.completion_tokens == 12
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + 12
    chunks = list(_ask(client, messages, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens


def _pipeline_messages(messages):
    """The same conversation for ``Pipeline.submit(messages=...)``: data URLs as PIL images."""
    out = []
    for m in messages:
        content = m["content"]
        if not isinstance(content, str):
            content = [{"type": "image", "image": Image.open(io.BytesIO(base64.b64decode(p["image_url"]["url"].split(",")[1])))}
                       if p["type"] == "image_url" else p for p in content]
        out.append({"role": m["role"], "content": content})
    return out


def test_greedy_text_equals_pipeline_multi_turn_two_images_text_only(server, pipe):
    """Multi-turn with an image in the first turn (the follow-up repeats it: its vision features
    come from the cache), two images in one turn, text only, a system prompt: the server's
    greedy text is Pipeline's for the same messages."""
    client = server.client()
    first = [{"role": "system", "content": "You are terse."}, _user("What is in this image?", IMG_A)]
    answer = _ask(client, first).choices[0].message.content
    hits = server.metrics().get("qwen3vl_vision_cache_hits_total", 0)
    cases = [
        first,
        [*first, {"role": "assistant", "content": answer}, {"role": "user", "content": "And its colours?"}],
        [_user("Compare these", IMG_A, IMG_B)],
        [_user("Which is brighter?", IMG_W)],
        [{"role": "user", "content": "Hello there"}],
    ]
    for messages in cases:
        got = _ask(client, messages)
        want = pipe.submit(messages=_pipeline_messages(messages), max_new_tokens=12).wait()
        assert got.choices[0].message.content == want.text
        assert got.usage.prompt_tokens == want.prompt_tokens
    assert server.metrics()["qwen3vl_vision_cache_hits_total"] >= hits + 2  # the follow-up and IMG_A again


def test_same_answer_alone_and_among_four_concurrent(server):
    client = server.client()
    requests = [[_user(f"Question {i}: what do you see?", IMG_A if i % 2 else IMG_B)] if i < 2
                else [{"role": "user", "content": f"Tell me about number {i}"}] for i in range(4)]
    alone = [_ask(client, m, max_tokens=10 + i).choices[0].message.content for i, m in enumerate(requests)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(lambda i, m: _ask(client, m, max_tokens=10 + i, stream=i % 2 == 1), i, m)
                   for i, m in enumerate(requests)]
        together = []
        for i, f in enumerate(futures):
            r = f.result(timeout=120)
            together.append("".join(c.choices[0].delta.content or "" for c in r) if i % 2 else r.choices[0].message.content)
    assert together == alone


def test_sampling_fields_and_stop_strings(server):
    client = server.client()
    messages = [{"role": "user", "content": "Count"}]
    full = _ask(client, messages, max_tokens=16).choices[0].message.content
    stop = full[len(full) // 2: len(full) // 2 + 6]
    cut = full[: full.index(stop)]
    got = _ask(client, messages, max_tokens=16, stop=[stop, "never-seen"])
    assert (got.choices[0].message.content, got.choices[0].finish_reason) == (cut, "stop")
    streamed = list(_ask(client, messages, max_tokens=16, stop=stop, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == cut
    assert streamed[-1].choices[0].finish_reason == "stop"
    # Seeded sampling repeats itself; top_k (an extension) goes through extra_body.
    kw = dict(temperature=0.9, top_p=0.9, seed=7, extra_body={"top_k": 50}, max_completion_tokens=10)
    a = client.chat.completions.create(model="tiny-random", messages=messages, **kw)
    b = client.chat.completions.create(model="tiny-random", messages=messages, **kw)
    assert a.choices[0].message.content == b.choices[0].message.content


def test_local_paths_inside_the_allowed_dir(server, media_dir):
    client = server.client()
    for url in ["inside.png", str(media_dir / "inside.png"), (media_dir / "inside.png").as_uri()]:
        assert _ask(client, [_user("What is this?", url)], max_tokens=4).choices[0].finish_reason == "length"


# -- errors -----------------------------------------------------------------------------------------

def _raw(server, body, key=KEY, path="/v1/chat/completions"):
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(server.url + path, content=data, headers=headers, timeout=60)


def _good(server):
    r = _raw(server, {"model": "tiny-random", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 3


def _assert_error(response, status, match, code=None):
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert re.search(match, err["message"]), err
    assert "Traceback" not in response.text
    if code is not None:
        assert err["code"] == code, err


def _body(*messages, **kw):
    return {"model": "tiny-random", "messages": list(messages), "max_tokens": 3, **kw}


def test_client_mistakes_get_their_status_and_the_server_keeps_serving(server, media_dir):
    truncated = _png(224, 224, seed=9)
    cases = [
        (b'{"messages": [', 400, "not valid JSON", "invalid_json"),
        (b"\xff\xfe not json", 400, "not valid JSON", None),
        ([1, 2], 400, "JSON object", None),
        (_body({"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}), 400, "not supported",
         "unsupported_content_type"),
        (_body({"role": "tool", "content": "x"}), 400, "role", None),
        (_body({"role": "user", "content": [_image_part("data:image/png;base64,@@@")]}), 400, "base64", None),
        (_body({"role": "user", "content": [_image_part(_data_url(b"GIF89a not an image"))]}), 400,
         "PNG, JPEG or WebP", "invalid_image"),
        (_body({"role": "user", "content": [_image_part(_data_url(truncated[: len(truncated) // 2]))]}), 400,
         "cannot be decoded", "invalid_image"),
        (_body({"role": "user", "content": [_image_part(_data_url(_png(8, 8)))]}), 400, "smaller than one", None),
        (_body({"role": "user", "content": "hi"}, n=2), 400, "n must be 1", None),
        (_body({"role": "user", "content": "hi"}, temperature=-1), 400, "temperature", None),
        (_body({"role": "user", "content": "hi"}, max_tokens=0), 400, "max_tokens", None),
        (_body({"role": "user", "content": [_image_part("../outside/secret.png")]}), 400, "outside", "path_not_allowed"),
        (_body({"role": "user", "content": [_image_part("link.png")]}), 400, "outside", "path_not_allowed"),
        (_body({"role": "user", "content": [_image_part("/etc/passwd")]}), 400, "outside", "path_not_allowed"),
        (_body({"role": "user", "content": [_image_part("http://127.0.0.1:9/cat.png")]}), 400, "allow-url-fetch", None),
        (_body({"role": "user", "content": "hi"}, model="gpt-4o"), 404, "does not exist", "model_not_found"),
    ]
    for body, status, match, code in cases:
        _assert_error(_raw(server, body), status, match, code)
        _good(server)
    _assert_error(_raw(server, _body({"role": "user", "content": "hi"}), key=None), 401, "API key", "invalid_api_key")
    _assert_error(_raw(server, _body({"role": "user", "content": "hi"}), key="wrong"), 401, "API key")
    _good(server)
    with pytest.raises(openai.AuthenticationError):
        _ask(server.client(key="wrong"), [{"role": "user", "content": "hi"}])
    with pytest.raises(openai.NotFoundError):
        server.client().chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError):
        _ask(server.client(), [{"role": "user", "content": "hi"}], n=3)
    _good(server)
    r = httpx.get(server.url + "/no/such/path", timeout=10)
    _assert_error(r, 404, "Not Found")


class _ImageHost:
    """A loopback HTTP server in a thread that plays the remote image hosts ``--allow-url-fetch``
    meets: a good PNG, one over the size limit with and without Content-Length, one that drips
    its bytes past the timeout, a redirect to a file: URL, a 404, a page that is not an image."""

    def __init__(self, png: bytes, big: bytes, files: dict | None = None):
        import http.server
        import threading

        host = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                host.paths.append(self.path)
                if self.path in (files or {}):
                    self._send(200, *files[self.path])
                elif self.path == "/cat.png":
                    self._send(200, png)
                elif self.path == "/big.png":
                    self._send(200, big)
                elif self.path == "/big-chunked.png":
                    self.send_response(200)
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    for i in range(0, len(big), 4096):
                        part = big[i:i + 4096]
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
                    self.wfile.write(b"0\r\n\r\n")
                elif self.path == "/slow.png":
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(png)))
                    self.end_headers()
                    for i in range(len(png)):  # one byte per 0.2 s: far past the 2 s deadline
                        if host.stop.wait(0.2):
                            return
                        try:
                            self.wfile.write(png[i:i + 1])
                            self.wfile.flush()
                        except OSError:  # the server gave up on us: as intended
                            return
                elif self.path == "/to-file":
                    self.send_response(302)
                    self.send_header("Location", "file:///etc/passwd")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif self.path == "/page.html":
                    self._send(200, b"<html>not an image</html>", "text/html")
                else:
                    self._send(404, b"no such image", "text/plain")

            def _send(self, status, body, kind="image/png"):
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.paths: list[str] = []
        self.stop = threading.Event()
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def test_url_fetch_only_when_allowed_within_its_limits(vision_bundle, server, pipe, media_dir, tmp_path):
    png, big = _png(224, 224, seed=1), _png(320, 320, seed=3)  # IMG_A's bytes; big: over the 0.2 MiB limit
    assert len(big) > 0.2 * 2**20 >= len(png), (len(big), len(png))
    clip = media_dir / "clip.mkv"
    files = {"/clip.mkv": (clip.read_bytes(), "video/x-matroska")} if _HAVE_AV and clip.is_file() else {}
    host = _ImageHost(png, big, files)
    srv = ServerProcess(vision_bundle, ["--allow-url-fetch", "--url-timeout", 2, "--max-image-mb", 0.2],
                        tmp_path / "fetch.log")
    try:
        # not fetched by the server started without --allow-url-fetch: nothing reaches the host
        _assert_error(_raw(server, _body(_user("hi", host.url + "/cat.png"))), 400, "allow-url-fetch")
        assert host.paths == []
        # fetched: the same answer as the same bytes sent as a data: URL
        fetched = _ask(srv.client(), [_user("What is this?", host.url + "/cat.png")])
        inline = _ask(server.client(), [_user("What is this?", IMG_A)])
        assert fetched.choices[0].message.content == inline.choices[0].message.content
        assert host.paths == ["/cat.png"]
        if files:  # a video URL too: the same answer as Pipeline on the same file
            question = {"type": "text", "text": "What happens?"}
            got = _ask(srv.client(), [{"role": "user", "content": [_video_part(host.url + "/clip.mkv"), question]}])
            want = pipe.submit(messages=[{"role": "user", "content": [{"type": "video", "video": clip}, question]}],
                               max_new_tokens=12).wait()
            assert got.choices[0].message.content == want.text and host.paths[-1] == "/clip.mkv"
        cases = [
            ("/big.png", 413, "over the limit", "image_too_large"),
            ("/big-chunked.png", 413, "over the limit", "image_too_large"),
            ("/missing.png", 400, "HTTP 404", None),
            ("/to-file", 400, "(?i)redirect", None),
            ("/page.html", 400, "PNG, JPEG or WebP", "invalid_image"),
        ]
        for path, status, match, code in cases:
            _assert_error(_raw(srv, _body(_user("hi", host.url + path)), key=None), status, match, code)
            _good_on(srv)
        t0 = time.monotonic()
        _assert_error(_raw(srv, _body(_user("hi", host.url + "/slow.png")), key=None), 400, "within 2 s")
        assert time.monotonic() - t0 < 10  # cut off at the deadline, not after the whole drip
        _assert_error(_raw(srv, _body(_user("hi", "http://127.0.0.1:9/cat.png")), key=None), 400, "could not fetch")
        _good_on(srv)
    finally:
        host.close()
        rc = srv.stop()
    log = srv.log()
    assert "Traceback" not in log, log
    assert rc == 0, log


def _good_on(srv):
    r = _raw(srv, {"model": "tiny-random", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}, key=None)
    assert r.status_code == 200, r.text


def test_prompt_over_the_context_is_refused_before_vision_work(server):
    before = server.metrics()
    long_text = "word " * 9000
    r = _raw(server, _body(_user(long_text, IMG_B)))
    _assert_error(r, 400, r"context is 8192 tokens; the messages take \d+ tokens", "context_length_exceeded")
    after = server.metrics()
    assert after.get("qwen3vl_vision_cache_misses_total", 0) == before.get("qwen3vl_vision_cache_misses_total", 0)
    assert after.get("qwen3vl_vision_cache_hits_total", 0) == before.get("qwen3vl_vision_cache_hits_total", 0)
    _good(server)


@pytest.mark.slow  # a server of its own
def test_limits_queue_and_disconnect(small_server):
    """413 for a body and an image over the limits; 429 while the one slot is busy and nobody
    may wait; a client that disconnects mid-stream cancels its sequence and frees the slot."""
    srv = small_server
    _assert_error(_raw(srv, _body({"role": "user", "content": "x" * 70_000})), 413, "over the limit", "body_too_large")
    _good(srv)
    big = _data_url(_png(96, 96, seed=4))  # 27 KB of noise: over 16 KiB, under the 64 KiB body
    _assert_error(_raw(srv, _body(_user("hi", big))), 413, "over the limit", "image_too_large")
    _good(srv)
    before = srv.metrics()
    client = srv.client()
    stream = _ask(client, [{"role": "user", "content": "go on forever"}], max_tokens=4000, stream=True)
    it = iter(stream)
    next(it), next(it), next(it)  # decoding: the only slot is busy
    _assert_error(_raw(srv, _body({"role": "user", "content": "hi"})), 429, "busy", "queue_full")
    with pytest.raises(openai.RateLimitError):
        _ask(client, [{"role": "user", "content": "hi"}])
    stream.close()  # the client goes away mid-stream
    deadline = time.monotonic() + 30
    while (m := srv.metrics())["qwen3vl_active_sequences"] != 0 or \
            m["qwen3vl_cancelled_requests_total"] < before["qwen3vl_cancelled_requests_total"] + 1:
        assert time.monotonic() < deadline, m
        time.sleep(0.1)
    assert m["qwen3vl_generated_tokens_total"] - before["qwen3vl_generated_tokens_total"] < 4000
    _good(srv)
    statuses = {k for k in m if k.startswith("qwen3vl_requests_total")}
    assert any('status="429"' in k for k in statuses) and any('status="413"' in k for k in statuses)
    assert m["qwen3vl_time_to_first_token_seconds_count"] >= 1


@pytest.mark.slow  # a server of its own
def test_sigterm_finishes_the_request_in_flight(vision_bundle, tmp_path):
    srv = ServerProcess(vision_bundle, ["--max-batch", 2, "--shutdown-timeout", 60], tmp_path / "term.log")
    try:
        client = srv.client()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            future = pool.submit(_ask, client, [{"role": "user", "content": "a long answer"}], 300)
            deadline = time.monotonic() + 30
            while srv.metrics()["qwen3vl_active_sequences"] < 1:
                assert time.monotonic() < deadline and not future.done()
                time.sleep(0.05)
            srv.proc.send_signal(signal.SIGTERM)
            result = future.result(timeout=120)
        assert result.usage.completion_tokens == 300 and result.choices[0].finish_reason == "length"
        assert srv.proc.wait(60) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(srv.url + "/health", timeout=5)
    finally:
        srv.stop()
    log = srv.log()
    assert "Traceback" not in log and "stopped" in log, log


def test_missing_extra_is_one_line(monkeypatch, capsys, vision_bundle):
    from qwen3vl_compile.serve import cli

    def missing():
        raise cli.ServeError(cli.EXTRA_HINT)

    monkeypatch.setattr(cli, "_import_stack", missing)
    assert cli.main([str(vision_bundle), "--port", "0"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "qwen3vl-serve: error: [serve] " + cli.EXTRA_HINT


def test_stop_matcher_holds_back_a_possible_stop():
    from qwen3vl_compile.serve.protocol import StopMatcher

    m = StopMatcher(["END", "xyz"])
    out = [m.push(p) for p in ["ab", "cE", "N", "Dtail"]]
    assert "".join(out) == "abc" and m.stopped and m.flush() == ""
    m = StopMatcher(["END"])
    assert "".join(m.push(p) for p in ["abE", "Nx"]) + m.flush() == "abENx" and not m.stopped
    assert StopMatcher([]).push("anything") == "anything"



# -- video ------------------------------------------------------------------------------------------

@needs_av
def test_video_greedy_text_equals_pipeline(server, pipe, media_dir):
    """A video as a data: URL, by allowed path, and with an image in one message: the server's
    greedy text is Pipeline's on the same file for the same messages; nothing is left in the
    server's temporary directory."""
    client = server.client()
    clip = media_dir / "clip.mkv"
    inline = _data_url(clip.read_bytes(), "video/x-matroska")
    cases = [
        ([_video_part(inline)], [{"type": "video", "video": clip}]),
        ([_video_part("clip.mkv")], [{"type": "video", "video": clip}]),
        ([_image_part(IMG_A), _video_part(inline)],
         [{"type": "image", "image": Image.open(io.BytesIO(base64.b64decode(IMG_A.split(",")[1])))},
          {"type": "video", "video": clip}]),
    ]
    for parts, pipe_parts in cases:
        got = _ask(client, [{"role": "user", "content": [*parts, {"type": "text", "text": "What happens?"}]}])
        want = pipe.submit(messages=[{"role": "user", "content": [*pipe_parts, {"type": "text", "text": "What happens?"}]}],
                           max_new_tokens=12).wait()
        assert got.choices[0].message.content == want.text
        assert got.usage.prompt_tokens == want.prompt_tokens
    assert want.videos[0]["frames"] == 4 and want.videos[0]["served_by"].startswith("bucket 224"), want.videos
    assert list(server.tmp_dir.glob("qwen3vl-video-*")) == []


@needs_av
def test_video_mistakes_are_openai_errors(server, tmp_path):
    """Each refused, the server keeps serving, no temporary file is left behind."""
    wav = io.BytesIO()
    with av.open(wav, "w", format="wav") as out:
        stream = out.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 8000), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            out.mux(packet)
    long_clip = io.BytesIO()  # 20 frames of 1280x720 at 2 fps: 8800 video tokens, over the 8192 context
    write_clip(long_clip, [np.full((720, 1280, 3), 100, np.uint8)] * 20, 2, codec="mpeg4", fmt="mp4")
    mp4 = lambda data: _video_part(_data_url(data, "video/mp4"))  # noqa: E731
    user = lambda part: _body({"role": "user", "content": [part, {"type": "text", "text": "hi"}]})  # noqa: E731
    cases = [
        (user(mp4(np.random.default_rng(1).bytes(5000))), 400, r"video of messages\[0\]\.content\[0\]\.video_url: "
         r"cannot be read", "invalid_video"),
        (user(mp4(wav.getvalue())), 400, "has no video stream", "invalid_video"),
        (user(mp4(np.random.default_rng(2).bytes(1_100_000))), 413, "over the limit of 1048576", "video_too_large"),
        (user(_video_part("huge.mp4")), 413, "over the limit", "video_too_large"),
        (user(mp4(long_clip.getvalue())), 400, r"context is 8192 tokens; the messages take \d+ tokens with their "
         r"images and videos \(videos: 20 frames of 1280x704 = 8800 tokens\)", "context_length_exceeded"),
        (user(_video_part(_data_url(b"x", "video/avi"))), 400, "must be data:<video/mp4", None),
        (user(_video_part("../outside/clip.mkv")), 400, "outside", "path_not_allowed"),
        (user(_video_part("http://127.0.0.1:9/clip.mp4")), 400, "allow-url-fetch", None),
        (_body({"role": "assistant", "content": [_video_part("clip.mkv")]}), 400, "only allowed in user messages", None),
    ]
    for body, status, match, code in cases:
        _assert_error(_raw(server, body), status, match, code)
        _good(server)
    assert list(server.tmp_dir.glob("qwen3vl-video-*")) == []


@pytest.mark.slow  # a server of its own
def test_a_server_without_pyav_names_the_extra(vision_bundle, tmp_path, monkeypatch):
    blocker = tmp_path / "no-av" / "av"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('PyAV is hidden for this test')\n")
    monkeypatch.setenv("PYTHONPATH", str(blocker.parent))
    srv = ServerProcess(vision_bundle, [], tmp_path / "no-av.log")
    try:
        body = _body({"role": "user", "content": [_video_part(_data_url(b"\0" * 64, "video/mp4")), {"type": "text", "text": "hi"}]})
        _assert_error(_raw(srv, body, key=None), 400, r"needs PyAV, the \[video\] extra \(pip install 'qwen3vl-compile\[video\]'\)",
                      "video_unsupported")
        _good_on(srv)
    finally:
        rc = srv.stop()
    log = srv.log()
    assert "Traceback" not in log, log
    assert rc == 0, log
