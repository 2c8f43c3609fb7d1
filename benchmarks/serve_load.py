"""Load and fault run of ``qwen3vl-serve``: many concurrent OpenAI clients, mixed requests.

    python benchmarks/serve_load.py --bundle DIR --clients 8 --requests 16 --max-batch 4

Starts a real server process on a free loopback port (always stopped at the end), then:

1. **solo**: each distinct request once, one at a time, plain: its greedy answer alone;
2. **warm-up**: every client sends its first ``--warmup`` requests of the mix (RSS read after);
3. **load**: ``--clients`` threads, each with its own ``openai`` client, send ``--requests``
   requests back to back: plain and streamed, with 0, 1 or 2 images (``data:`` URLs: PNG, JPEG,
   WebP, sized to the bundle's buckets), different prompts and ``max_tokens``; some streamed
   requests are closed by their client after the first chunk (a client that goes away
   mid-stream, asking for up to 1000 tokens).

Checks: every request gets its response (none lost), every completed answer equals its solo
answer (none mixed up), no error but the intended disconnects, the server's /metrics shows
no active, waiting or preparing sequence afterwards and counts each disconnect as cancelled,
no traceback in the server's log; reports requests/s, p50/p95 time to first token (streamed
requests, at the client), p50/p95 latency (completed requests), tokens/s (completion tokens of
completed requests over the load's wall time), and the server's RSS (``VmRSS``) after the
warm-up and after the load. ``tests/test_serve_load.py`` runs the same workload and asserts.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import dataclasses
import datetime
import io
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, machine, save, table  # noqa: E402

CALL_TIMEOUT = 60.0  # seconds: every client call is bounded
DISCONNECT_TOKENS = 1000  # what a client that goes away mid-stream asked for


# -- the server process ---------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``qwen3vl-serve BUNDLE`` as a child process on a free loopback port; a context manager
    that always stops it (SIGTERM, then SIGKILL)."""

    def __init__(self, bundle, args, log_path: Path, start_timeout: float = 90, api_key: str | None = "load-key",
                 client_timeout: float = CALL_TIMEOUT):
        """``api_key`` None: the server takes any key (no ``--api-key``); ``client_timeout``
        bounds every call of :meth:`client`'s clients."""
        import httpx

        self.api_key = api_key
        self.client_timeout = client_timeout
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path)
        self._log = open(self.log_path, "wb")
        cmd = [sys.executable, "-m", "qwen3vl_compile.serve.cli", str(bundle), "--host", "127.0.0.1",
               "--port", str(self.port), *(["--api-key", api_key] if api_key else []), *map(str, args)]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT)
        deadline = time.monotonic() + start_timeout
        while True:
            if self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"the server exited with {self.proc.returncode}: {self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not answer /health within {start_timeout}s: {self.log()}")
            time.sleep(0.2)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def client(self, key: str | None = None):
        """An ``openai`` client of this server, with the server's key unless ``key`` is given."""
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=key or self.api_key or "unused", max_retries=0,
                             timeout=self.client_timeout)

    def model(self) -> str:
        return self.client().models.list().data[0].id

    def metrics(self) -> dict[str, float]:
        import httpx

        out = {}
        for line in httpx.get(self.url + "/metrics", timeout=10).text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def settle(self, timeout: float = 30) -> dict[str, float]:
        """/metrics once no sequence is active, waiting or being prepared (bounded wait)."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            if (m["qwen3vl_active_sequences"], m["qwen3vl_waiting_sequences"], m["qwen3vl_preparing_requests"]) == (0, 0, 0):
                return m
            if time.monotonic() > deadline:
                raise RuntimeError(f"sequences still busy {timeout}s after the load: {m}")
            time.sleep(0.1)

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS in /proc/PID/status")

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if not self._log.closed:
            self._log.close()
        return self.proc.returncode


# -- the workload ---------------------------------------------------------------------------

def bucket_sizes(bundle) -> list[tuple[int, int]]:
    """(height, width) of the bundle's vision buckets: images of these sizes need no fallback."""
    manifest = json.loads((Path(bundle) / "manifest.json").read_text())
    sizes = [(b["height"], b["width"]) for b in manifest.get("buckets", []) if b.get("height")]
    if not sizes:
        raise SystemExit(f"{bundle} has no fixed-size vision bucket: compile it with --buckets (e.g. 224,256)")
    return sizes


def _image_url(h: int, w: int, seed: int, fmt: str) -> str:
    from PIL import Image

    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    mime = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}[fmt]
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode()}"


def images(bundle) -> list[str]:
    """Three images as data: URLs (PNG, JPEG, WebP), each the size of one of the bundle's buckets."""
    sizes = bucket_sizes(bundle)
    return [_image_url(*sizes[i % len(sizes)], seed=10 + i, fmt=fmt) for i, fmt in enumerate(("PNG", "JPEG", "WEBP"))]


@dataclasses.dataclass(frozen=True)
class Spec:
    """One distinct request: a prompt, its images (indices into :func:`images`), max_tokens."""

    prompt: str
    images: tuple[int, ...]
    max_tokens: int
    system: str | None = None

    def messages(self, urls: list[str]) -> list[dict]:
        parts = [{"type": "image_url", "image_url": {"url": urls[i]}} for i in self.images]
        user = {"role": "user", "content": [*parts, {"type": "text", "text": self.prompt}] if parts else self.prompt}
        return ([{"role": "system", "content": self.system}] if self.system else []) + [user]


SPECS = [
    Spec("What shape is in this image?", (0,), 8),
    Spec("Hello there, who are you?", (), 12),
    Spec("Compare these two pictures.", (0, 1), 10),
    Spec("What colour is the shape?", (1,), 6),
    Spec("Count from one to ten.", (), 16, system="You are terse."),
    Spec("Describe this image in detail.", (2,), 14),
    Spec("Which of the two is brighter?", (2, 0), 8),
    Spec("Name three animals.", (), 9),
    Spec("Is there a circle here?", (1,), 11),
    Spec("Write a haiku about the sea.", (), 15),
    Spec("Where is the shape placed?", (0,), 12, system="Answer in one word."),
    Spec("What do these have in common?", (1, 2), 7),
]
# What a client that goes away mid-stream asks for: a long answer about an image.
DISCONNECT = Spec("Tell me a very long story about this picture.", (0,), DISCONNECT_TOKENS)


@dataclasses.dataclass(frozen=True)
class Job:
    client: int
    index: int
    spec: int  # index into SPECS; -1: DISCONNECT
    stream: bool
    disconnect: bool


def plan(clients: int, requests: int) -> list[list[Job]]:
    """Each client's requests, in order: every client cycles through all the specs from its own
    offset, streamed every other request; odd clients go away mid-stream at requests 3 and 11."""
    out = []
    for c in range(clients):
        jobs = []
        for j in range(requests):
            disconnect = c % 2 == 1 and j % 8 == 3
            spec = -1 if disconnect else (7 * c + j) % len(SPECS)
            jobs.append(Job(c, j, spec, disconnect or (c + j) % 2 == 0, disconnect))
        out.append(jobs)
    return out


@dataclasses.dataclass
class Record:
    job: Job
    ok: bool = False
    text: str | None = None
    finish_reason: str | None = None
    completion_tokens: int | None = None
    error: str | None = None
    ttft_s: float | None = None  # streamed: to the first chunk with text
    latency_s: float | None = None


def call(client, model: str, job: Job, urls: list[str]) -> Record:
    """One request as the client sends it; errors are recorded, never raised."""
    spec = DISCONNECT if job.spec < 0 else SPECS[job.spec]
    rec = Record(job)
    kw = dict(model=model, messages=spec.messages(urls), max_tokens=spec.max_tokens, temperature=0)
    t0 = time.perf_counter()
    try:
        if not job.stream:
            r = client.chat.completions.create(**kw)
            rec.text, rec.finish_reason = r.choices[0].message.content, r.choices[0].finish_reason
            rec.completion_tokens = r.usage.completion_tokens
        else:
            stream = client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True})
            pieces = []
            try:
                for chunk in stream:
                    if chunk.usage is not None:
                        rec.completion_tokens = chunk.usage.completion_tokens
                    if not chunk.choices:
                        continue
                    choice = chunk.choices[0]
                    if choice.delta.content:
                        if rec.ttft_s is None:
                            rec.ttft_s = time.perf_counter() - t0
                        pieces.append(choice.delta.content)
                        if job.disconnect:
                            break  # the client goes away mid-stream
                    if choice.finish_reason:
                        rec.finish_reason = choice.finish_reason
            finally:
                stream.close()
            rec.text = "".join(pieces)
        rec.ok = True
    except Exception as e:  # noqa: BLE001 - recorded, and counted by the checks
        rec.error = f"{type(e).__name__}: {e}"
    rec.latency_s = time.perf_counter() - t0
    return rec


def run_clients(server: Server, model: str, jobs: list[list[Job]], urls: list[str], deadline: float) -> list[Record]:
    """Each client's jobs back to back in its own thread (its own ``openai`` client)."""
    def one_client(client_jobs):
        client = server.client()
        out = []
        for job in client_jobs:
            if time.monotonic() > deadline:
                out.append(Record(job, error="not sent: the run's deadline passed"))
                continue
            out.append(call(client, model, job, urls))
        return out

    records = []
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(one_client, j) for j in jobs]
        for f in futures:
            records += f.result(timeout=max(1.0, deadline - time.monotonic() + 2 * CALL_TIMEOUT))
    return records


def solo_answers(server: Server, model: str, urls: list[str]) -> list[Record]:
    client = server.client()
    return [call(client, model, Job(-1, i, i, False, False), urls) for i in range(len(SPECS))]


def check(records: list[Record], solo: list[Record], expected: int) -> list[str]:
    """What went wrong: lost requests, errors, answers that differ from their solo answer."""
    problems = []
    if len(records) != expected:
        problems.append(f"{len(records)} responses for {expected} requests")
    for r in records:
        j = r.job
        where = f"client {j.client} request {j.index} ({'disconnect' if j.disconnect else SPECS[j.spec].prompt!r}, " \
                f"{'streamed' if j.stream else 'plain'})"
        if not r.ok:
            problems.append(f"{where}: {r.error}")
        elif j.disconnect:
            if not r.text:
                problems.append(f"{where}: no text before the disconnect")
        else:
            want = solo[j.spec]
            if r.text != want.text:
                problems.append(f"{where}: {r.text!r} != its solo answer {want.text!r}")
            elif (r.finish_reason, r.completion_tokens) != (want.finish_reason, want.completion_tokens):
                problems.append(f"{where}: finish {r.finish_reason}/{r.completion_tokens} tokens != solo "
                                f"{want.finish_reason}/{want.completion_tokens}")
    return problems


def _pct(values, q):
    return float(np.percentile(values, q)) if values else float("nan")


def summarize(records: list[Record], wall_s: float) -> dict:
    done = [r for r in records if r.ok and not r.job.disconnect]
    ttft = [r.ttft_s for r in records if r.ok and r.job.stream and r.ttft_s is not None]
    lat = [r.latency_s for r in done]
    tokens = sum(r.completion_tokens or 0 for r in done)
    return {
        "requests": len(records), "completed": len(done), "disconnected": sum(r.job.disconnect for r in records),
        "errors": sum(not r.ok for r in records), "wall_s": wall_s,
        "requests_per_s": len([r for r in records if r.ok]) / wall_s,
        "ttft_p50_s": _pct(ttft, 50), "ttft_p95_s": _pct(ttft, 95),
        "latency_p50_s": _pct(lat, 50), "latency_p95_s": _pct(lat, 95),
        "completion_tokens": tokens, "tokens_per_s": tokens / wall_s,
    }


def measure(bundle, clients: int = 8, requests: int = 16, max_batch: int = 4, warmup: int = 4,
            threads: int = 0, log_path: Path | None = None, deadline_s: float = 600, vision_cache_mb: int = 256) -> dict:
    """The whole run (solo, warm-up, load) against a fresh server; returns everything measured."""
    deadline = time.monotonic() + deadline_s
    urls = images(bundle)
    log_path = Path(log_path or Path(bundle).parent / "serve_load.log")
    args = ["--max-batch", max_batch, "--max-waiting", 2 * clients, "--threads", threads, "--log-level", "warning",
            "--vision-cache-mb", vision_cache_mb]
    with Server(bundle, args, log_path) as server:
        model = server.model()
        t = time.perf_counter()
        solo = solo_answers(server, model, urls)
        solo_s = time.perf_counter() - t
        bad = [r.error for r in solo if not r.ok]
        if bad:
            raise RuntimeError(f"solo requests failed: {bad}")

        warm = run_clients(server, model, [j[:warmup] for j in plan(clients, max(warmup, 4))], urls, deadline)
        before = server.settle()
        rss_warm = server.rss_bytes()

        jobs = plan(clients, requests)
        t = time.perf_counter()
        records = run_clients(server, model, jobs, urls, deadline)
        wall = time.perf_counter() - t
        after = server.settle()
        rss_after = server.rss_bytes()
        rc = server.stop()
        log = server.log()

    def delta(name):
        return after.get(name, 0) - before.get(name, 0)

    chat_ok = 'qwen3vl_requests_total{endpoint="/v1/chat/completions",status="200"}'
    return {
        "solo": solo, "solo_s": solo_s, "warm": warm, "records": records,
        "expected": clients * requests, "summary": summarize(records, wall),
        "problems": check(warm, solo, clients * warmup) + check(records, solo, clients * requests),
        "metrics_after": after,
        "server": {"ok_responses": delta(chat_ok), "cancelled": delta("qwen3vl_cancelled_requests_total"),
                   "non_200": sum(after[k] - before.get(k, 0) for k in after
                                  if k.startswith("qwen3vl_requests_total") and 'status="200"' not in k),
                   "generated_tokens": delta("qwen3vl_generated_tokens_total")},
        "rss_warm_bytes": rss_warm, "rss_after_bytes": rss_after, "exit_code": rc,
        "traceback_in_log": "Traceback" in log,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-batch", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=4, help="requests per client before RSS is first read")
    ap.add_argument("--threads", type=int, default=0, help="the server's ONNX Runtime threads (0: all cores)")
    ap.add_argument("--vision-cache-mb", type=int, default=256, help="the server's vision cache (0: every image encoded)")
    ap.add_argument("--name", default="serve_load", help="results file name under benchmarks/results/")
    args = ap.parse_args()

    res = measure(args.bundle, args.clients, args.requests, args.max_batch, args.warmup, args.threads,
                  log_path=Path("/tmp") / f"serve_load_{free_port()}.log", vision_cache_mb=args.vision_cache_mb)
    s = res["summary"]
    rss_w, rss_a = res["rss_warm_bytes"] / 2**20, res["rss_after_bytes"] / 2**20
    rows = [
        ["requests (completed + disconnected)", f"{s['requests']} ({s['completed']} + {s['disconnected']})"],
        ["errors / answers differing from solo / lost", f"{s['errors']} / {len(res['problems'])} / "
                                                         f"{res['expected'] - len(res['records'])}"],
        ["wall time of the load", f"{s['wall_s']:.2f} s"],
        ["requests/s", f"{s['requests_per_s']:.2f}"],
        ["time to first token p50 / p95 (streamed)", f"{s['ttft_p50_s'] * 1000:.0f} / {s['ttft_p95_s'] * 1000:.0f} ms"],
        ["latency p50 / p95 (completed)", f"{s['latency_p50_s'] * 1000:.0f} / {s['latency_p95_s'] * 1000:.0f} ms"],
        ["completion tokens/s (completed)", f"{s['tokens_per_s']:.1f}"],
        ["server RSS after warm-up -> after load", f"{rss_w:.0f} -> {rss_a:.0f} MiB ({(rss_a / rss_w - 1) * 100:+.1f}%)"],
        ["cancelled by the server (disconnects)", f"{res['server']['cancelled']:.0f}"],
    ]
    date = datetime.date.today().isoformat()
    mach = machine()
    md = (f"## qwen3vl-serve load ({date})\n\n{args.clients} clients x {args.requests} requests, "
          f"--max-batch {args.max_batch}, --vision-cache-mb {args.vision_cache_mb}, bundle {args.bundle.name}, "
          f"{mach['cpu']}, {mach['cores']} cores\n\n" + table(rows, ["", "measured"]))
    print(md)
    for p in res["problems"][:20]:
        print("PROBLEM:", p)
    payload = {"date": date, "machine": mach, "bundle": str(args.bundle), "clients": args.clients,
               "requests": args.requests, "max_batch": args.max_batch, "threads": args.threads,
               "vision_cache_mb": args.vision_cache_mb,
               "summary": s, "server": res["server"], "problems": res["problems"],
               "rss_warm_bytes": res["rss_warm_bytes"], "rss_after_bytes": res["rss_after_bytes"],
               "solo": [{"prompt": sp.prompt, "images": list(sp.images), "max_tokens": sp.max_tokens, "text": r.text,
                         "finish_reason": r.finish_reason, "completion_tokens": r.completion_tokens}
                        for sp, r in zip(SPECS, res["solo"])],
               "solo_s": res["solo_s"], "exit_code": res["exit_code"], "traceback_in_log": res["traceback_in_log"]}
    save(args.name, payload, md)
    return 1 if res["problems"] or res["traceback_in_log"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
