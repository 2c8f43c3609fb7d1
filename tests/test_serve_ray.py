"""``qwen3vl-serve OUT --ray``: 2 Ray Serve replicas on a local Ray instance (loopback) answer
OpenAI's own client with the same greedy text as the single-process server, plain and streamed,
with and without an image, and give the same OpenAI error shape; a corrupt bundle makes the
deployment refuse to start with one line (every replica verifies the bundle before it serves);
a replica killed mid-load is replaced, and every request of the load either gets its answer or
a clean error in OpenAI's shape (the proxy's middleware, checked alone too); the Ray options are
checked in one place.

Each server is a child process with a bounded start, always stopped (SIGTERM: it shuts Ray
Serve and its local Ray instance down; then SIGKILL)."""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("starlette", reason="the [serve] extra is not installed")
openai = pytest.importorskip("openai", reason="the openai client (the [test] extra) is not installed")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import serve_load  # noqa: E402  (the one launcher of a real server process)

START_TIMEOUT = 240  # Ray, its Serve controller and proxy, and 2 replicas on 2 busy cores


def _server(bundle, args, log_path):
    return serve_load.Server(bundle, ["--threads", 1, "--log-level", "warning", *args], log_path,
                             start_timeout=START_TIMEOUT, api_key=None, client_timeout=120)


def _image_url(seed: int, size: int = 224) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


REQUESTS = [
    [{"role": "user", "content": "Say hello."}],
    [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _image_url(1)}},
                                  {"type": "text", "text": "What is in the image?"}]}],
    [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _image_url(2, 256)}},
                                  {"type": "text", "text": "Describe it."}]},
     {"role": "assistant", "content": "A picture."},
     {"role": "user", "content": "And its colours?"}],
]


def _answers(server) -> list[tuple[str, str]]:
    """(plain, streamed) greedy text of each request."""
    client = server.client()
    model = server.model()
    out = []
    for messages in REQUESTS:
        plain = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0)
        stream = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0, stream=True)
        streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        out.append((plain.choices[0].message.content, streamed))
    return out


@pytest.fixture(scope="module")
def single_answers(vision_bundle, tmp_path_factory):
    log = tmp_path_factory.mktemp("single") / "server.log"
    with _server(vision_bundle, [], log) as server:
        return _answers(server)


@pytest.mark.slow  # starts Ray, Ray Serve and 2 replicas
def test_two_replicas_answer_as_the_single_process_server(vision_bundle, single_answers, tmp_path):
    with _server(vision_bundle, ["--ray", "--replicas", 2], tmp_path / "ray.log") as server:
        answers = _answers(server)
        assert all(a and a == b for a, b in answers), answers  # plain == streamed, and not empty
        assert answers == single_answers
        # The same error shape as the single-process server, from whichever replica answers.
        import httpx

        r = httpx.post(server.url + "/v1/chat/completions", content=b"not json", timeout=30)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json", r.text
        with pytest.raises(openai.NotFoundError):
            server.client().chat.completions.create(model="nope", messages=REQUESTS[0], max_tokens=2)
        assert "qwen3vl_requests_total" in httpx.get(server.url + "/metrics", timeout=30).text
        assert server.stop(timeout=120) == 0  # Serve, its replicas and the local Ray instance shut down
    log = (tmp_path / "ray.log").read_text()
    assert "with 2 replica(s) on Ray Serve at http://127.0.0.1:" in log and "stopped" in log, log


LONG = 48  # completion tokens of the killing load's requests: each stays in flight a while
CLIENTS, PER_CLIENT = 4, 4


def _replica_pids(server) -> list[int]:
    """The processes of the server's Ray Serve replicas (under its local Ray instance, titled
    ``ray::ServeReplica:...``)."""
    import psutil

    pids = []
    for p in psutil.Process(server.proc.pid).children(recursive=True):
        try:
            if "ServeReplica:" in " ".join(p.cmdline()):
                pids.append(p.pid)
        except psutil.Error:  # gone meanwhile
            pass
    return sorted(pids)


def _two_replicas(server, without: int | None = None) -> list[int] | None:
    """The 2 replicas' pids, once there are 2 and ``without`` is not one of them; else None."""
    pids = _replica_pids(server)
    return pids if len(pids) == 2 and without not in pids else None


def _wait_for(what, predicate, timeout: float):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.5)
    return value


def _ask(client, model, i: int, stream: bool, first_piece=None) -> str:
    """Request ``i`` of REQUESTS, greedy, LONG tokens: its text (errors raised as the client raises them)."""
    kw = dict(model=model, messages=REQUESTS[i], max_tokens=LONG, temperature=0)
    if not stream:
        return client.chat.completions.create(**kw).choices[0].message.content
    pieces = []
    with client.chat.completions.create(**kw, stream=True) as chunks:
        for c in chunks:
            if c.choices and c.choices[0].delta.content:
                pieces.append(c.choices[0].delta.content)
                if first_piece is not None:
                    first_piece.set()
    return "".join(pieces)


def _outcome(call) -> tuple[str, str]:
    """("ok", text), ("5xx", code): a 5xx in OpenAI's error shape, ("stream-error", code): OpenAI's
    error event in a stream already started (its 200 sent), else ("bad", what the client saw)."""
    shape = {"message", "type", "param", "code"}
    try:
        return "ok", call()
    except openai.APIStatusError as e:
        if e.status_code >= 500 and isinstance(e.body, dict) and set(e.body) == shape and e.body["type"] == "server_error":
            return "5xx", f"{e.status_code} {e.body['code']}"
        return "bad", f"{type(e).__name__} {e.status_code}: {e.body!r}"
    except openai.APIConnectionError as e:  # a hang (timeout) or a connection cut off: never acceptable
        return "bad", f"{type(e).__name__}: {e!r} (cause {e.__cause__!r})"
    except openai.APIError as e:
        if isinstance(e.body, dict) and set(e.body) == shape and e.body["type"] == "server_error":
            return "stream-error", e.body["code"]
        return "bad", f"{type(e).__name__}: {e.body!r}"
    except Exception as e:  # noqa: BLE001 - anything else the client raised
        return "bad", f"{type(e).__name__}: {e}"


@pytest.mark.slow  # starts Ray, Ray Serve and 2 replicas (3 with the replacement), kills one mid-load
def test_a_replica_killed_mid_load_is_replaced_and_every_request_ends_cleanly(vision_bundle, tmp_path):
    """4 clients x 4 requests (plain and streamed, with images) while one of the 2 replicas is
    killed (SIGKILL of its process, as the kernel's OOM killer does) once a stream is under way:
    every request gets the answer it got alone, or a clean error in OpenAI's shape (a 503 before
    the response started, an error event in a stream already started); none hangs (every call is
    bounded), none gets another request's text or a cut-off connection. Ray Serve starts a new
    replica, and the two answer as before."""
    with _server(vision_bundle, ["--ray", "--replicas", 2], tmp_path / "ray.log") as server:
        model = server.model()
        client = server.client()
        solo = {(i, s): _ask(client, model, i, s) for i in range(len(REQUESTS)) for s in (False, True)}
        assert all(solo.values()) and all(solo[i, False] == solo[i, True] for i in range(len(REQUESTS))), solo
        before = _wait_for("2 replica processes", lambda: _two_replicas(server), 60)

        streaming = threading.Event()
        killed = []

        def killer():
            if streaming.wait(120):
                os.kill(before[0], signal.SIGKILL)
                killed.append(time.monotonic())

        def one_client(c):
            own = server.client()  # its own connection pool; every call bounded by client_timeout
            out = []
            for j in range(PER_CLIENT):
                i, stream = (c + j) % len(REQUESTS), (c + j) % 2 == 0
                kind, detail = _outcome(lambda: _ask(own, model, i, stream, streaming if j else None))
                if kind == "ok" and detail != solo[i, stream]:
                    kind, detail = "mixed", f"{detail!r} != its solo answer {solo[i, stream]!r}"
                out.append((c, j, i, stream, kind, detail))
            return out

        t0 = time.monotonic()
        threading.Thread(target=killer, daemon=True).start()
        with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
            results = [r for f in [pool.submit(one_client, c) for c in range(CLIENTS)] for r in f.result(timeout=600)]
        wall = time.monotonic() - t0
        assert killed, "no stream started within 120 s: the replica was never killed"
        bad = [r for r in results if r[4] not in ("ok", "5xx", "stream-error")]
        assert not bad, bad
        failed = [r for r in results if r[4] != "ok"]
        print(f"load of {len(results)} requests in {wall:.1f} s; ended with an error: {failed}")
        # The kill hit requests in flight (else this test proves nothing about them), and only those.
        assert failed and all(r[5] in ("503 replica_unavailable", "replica_unavailable") for r in failed), failed

        after = _wait_for("a new replica in place of the killed one", lambda: _two_replicas(server, without=before[0]), 180)
        assert before[1] in after  # the other replica lived on
        # Both replicas (the new one once Serve sends it traffic) answer as before, every request.
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            again = list(pool.map(lambda k: _outcome(lambda: _ask(server.client(), model, k % len(REQUESTS), k % 2 == 0)),
                                  range(8), timeout=300))
        assert again == [("ok", solo[k % len(REQUESTS), k % 2 == 0]) for k in range(8)], again
        assert server.stop(timeout=120) == 0


def _through(app, method="POST"):
    """What a client gets from ``app`` behind the proxy's middleware: (status, headers, body, body messages)."""
    from qwen3vl_compile.serve.ray_proxy import OpenAIErrors

    sent = []

    async def receive():
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    asyncio.run(OpenAIErrors(app)({"type": "http", "method": method, "path": "/v1/chat/completions"}, receive, send))
    start = [m for m in sent if m["type"] == "http.response.start"]
    bodies = [m for m in sent if m["type"] == "http.response.body"]
    assert len(start) == 1 and bodies and not bodies[-1].get("more_body", False), sent  # one whole response
    assert all(m.get("more_body", False) for m in bodies[:-1]), sent
    return start[0]["status"], dict(start[0]["headers"]), b"".join(m.get("body", b"") for m in bodies), len(bodies)


def test_the_proxy_middleware_answers_in_openai_shape():
    """The proxy's middleware alone (no Ray): what Serve's proxy does when a replica dies (returns
    with no response, or stops a stream halfway) and its own text errors become OpenAI's shape;
    our app's answers pass through untouched, chunk by chunk."""
    async def nothing(scope, receive, send):  # the replica died before answering
        return None

    status, headers, body, _ = _through(nothing)
    assert status == 503 and headers[b"content-type"] == b"application/json"
    err = json.loads(body)["error"]
    assert err["code"] == "replica_unavailable" and err["type"] == "server_error" and "retry" in err["message"], err

    async def cut_stream(scope, receive, send):  # died mid-stream
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        await send({"type": "http.response.body", "body": b'data: {"x": 1}\n\n', "more_body": True})

    status, _, body, _ = _through(cut_stream)
    events = [e[len("data: "):] for e in body.decode().split("\n\n") if e]
    assert status == 200 and events[0] == '{"x": 1}' and events[-1] == "[DONE]", events
    assert json.loads(events[1])["error"]["code"] == "replica_unavailable", events

    async def serve_text(scope, receive, send):  # Ray Serve's own refusal, in text
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(b"content-type", b"text/plain"), (b"retry-after", b"2")]})
        await send({"type": "http.response.body", "body": b"Deployment qwen3vl is unavailable.\nmore", "more_body": False})

    status, headers, body, _ = _through(serve_text)
    assert status == 503 and headers[b"retry-after"] == b"2"
    assert json.loads(body) == {"error": {"message": "Deployment qwen3vl is unavailable.", "type": "server_error",
                                          "param": None, "code": None}}

    async def ours(scope, receive, send):  # our app's answers: untouched
        await send({"type": "http.response.start", "status": 400, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b'{"error": {}}', "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    assert _through(ours) == (400, {b"content-type": b"application/json"}, b'{"error": {}}', 2)

    async def finished_stream(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        for piece in (b"data: a\n\n", b"data: [DONE]\n\n"):
            await send({"type": "http.response.body", "body": piece, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    assert _through(finished_stream)[2:] == (b"data: a\n\ndata: [DONE]\n\n", 3)


@pytest.mark.slow  # starts Ray and Ray Serve, whose replicas all refuse the bundle
def test_a_corrupt_bundle_refuses_to_start_in_one_line(vision_bundle, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(vision_bundle, bundle)
    data = bytearray((bundle / "embedding.onnx").read_bytes())
    data[-1] ^= 1
    (bundle / "embedding.onnx").write_bytes(bytes(data))
    proc = subprocess.run([sys.executable, "-m", "qwen3vl_compile.serve.cli", str(bundle), "--ray", "--replicas", "2",
                           "--threads", "1", "--host", "127.0.0.1", "--port", str(serve_load.free_port())],
                          capture_output=True, text=True, timeout=START_TIMEOUT, cwd=ROOT)
    err = proc.stderr.strip()
    assert proc.returncode == 1 and proc.stdout == "" and len(err.splitlines()) == 1, err
    assert err.startswith("qwen3vl-serve: error: [bundle] no replica started: ") and "embedding.onnx: sha256 differs" in err, err


@pytest.mark.parametrize("argv,needle", [
    (["--replicas", "2"], "[arguments] --replicas needs --ray"),
    (["--autoscale", "1:2", "--ray-address", "auto"], "[arguments] --autoscale and --ray-address need --ray"),
    (["--ray", "--replicas", "0"], "[arguments] --replicas must be a whole number >= 1, got 0"),
    (["--ray", "--replicas", "2", "--autoscale", "1:2"], "[arguments] give --replicas or --autoscale MIN:MAX, not both"),
    (["--ray", "--autoscale", "3:1"], "[arguments] --autoscale '3:1': give MIN:MAX replicas"),
    (["--ray", "--autoscale", "2"], "[arguments] --autoscale '2': give MIN:MAX replicas"),
])
def test_ray_options_are_checked_before_anything(tmp_path, capsys, argv, needle):
    from qwen3vl_compile.serve.cli import main

    rc = main([str(tmp_path / "no-bundle"), *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and needle in err, err


def test_without_ray_the_extra_is_named(text_bundle, monkeypatch, capsys):
    from qwen3vl_compile.serve.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError, as on a slim install
    rc = main([str(text_bundle), "--ray", "--port", "0"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and err == "qwen3vl-serve: error: [ray] --ray needs the [ray] extra: pip install 'qwen3vl-compile[ray]'", err


def test_serve_run_builder_takes_the_commands_options(text_bundle, tmp_path):
    """``serve run qwen3vl_compile.serve.ray_serve:app_builder bundle=OUT ...`` (the README's config
    file): the options are qwen3vl-serve's own, checked by it; no Ray instance is started here."""
    pytest.importorskip("ray", reason="the [ray] extra is not installed")
    from qwen3vl_compile.errors import UsageError
    from qwen3vl_compile.serve.ray_serve import app_builder

    app = app_builder({"bundle": str(text_bundle), "replicas": "2", "threads": "1", "max_batch": "2",
                       "no_prefix_reuse": "true"})
    d = app._bound_deployment
    assert d.num_replicas == 2 and d.ray_actor_options["num_cpus"] == 1
    bundle, load, options = d.init_args
    assert bundle == str(text_bundle.resolve()) and load["max_batch"] == 2 and load["reuse_prefix"] is False
    assert options.model_name == "tiny-random"
    app = app_builder({"bundle": str(text_bundle), "autoscale": "1:3"})
    assert app._bound_deployment._deployment_config.autoscaling_config.max_replicas == 3
    with pytest.raises(UsageError, match="--autoscale '0:0'"):
        app_builder({"bundle": str(text_bundle), "autoscale": "0:0"})
