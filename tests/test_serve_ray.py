"""``qwen3vl-serve OUT --ray``: 2 Ray Serve replicas on a local Ray instance (loopback) answer
OpenAI's own client with the same greedy text as the single-process server, plain and streamed,
with and without an image, and give the same OpenAI error shape; a corrupt bundle makes the
deployment refuse to start with one line (every replica verifies the bundle before it serves);
the Ray options are checked in one place.

Each server is a child process with a bounded start, always stopped (SIGTERM: it shuts Ray
Serve and its local Ray instance down; then SIGKILL)."""

from __future__ import annotations

import base64
import io
import shutil
import subprocess
import sys
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
