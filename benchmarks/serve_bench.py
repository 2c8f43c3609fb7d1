"""``qwen3vl-serve`` beside the engine alone, and the vision cache on a second turn, in one run.

    python benchmarks/serve_bench.py --bundle /work/bench-scratch/4b-int4-v448 --threads 2
    python benchmarks/serve_bench.py --bundle TINY_BUNDLE --quick          # < 2 minutes, smoke

The bundle needs a 448x448 vision bucket (``qwen3vl-compile --model qwen3-vl-4b --buckets 448``).

1. **HTTP overhead** (aggregate tokens/s at 1, 2, 4, 8 concurrent clients): each client sends
   one streamed, greedy, text-only chat request (a different short question each, ``--tokens``
   completion tokens) and reads its server-sent events to the end with the ``openai`` package;
   the *engine alone* runs the same messages through :meth:`Pipeline.submit` in this process
   (one thread per request, each reading its text pieces): the same scheduler, KV pool and
   sampling, without HTTP. Both have ``max(N)`` slots and ``--threads`` threads; they never
   run at the same time (the pipeline waits idle while the server works, and the other way
   round). Rounds alternate (engine at N, then HTTP at N, for each N, ``--rounds`` times);
   aggregate tokens/s = completion tokens of the N requests / wall time from the first send
   to the last token, medians over rounds. Ratio = HTTP / engine.
2. **Second turn about the same image** (streamed, through HTTP): turn 1 asks about a new
   448x448 image (PNG data: URL); turn 2 sends the whole conversation again (the image, the
   answer, a follow-up question). Time to first token (client side) of each turn with the
   server's defaults (the vision cache skips the vision graph, prefix reuse skips the
   prefill of what the conversation's slot still caches), with the vision cache only
   (``--no-prefix-reuse``) and with neither (``--vision-cache-mb 0 --no-prefix-reuse``), each
   on its own server. Each round uses a new image, so turn 1 never hits a cache. The
   server's ``/metrics`` counts vision-cache hits and reused prompt tokens, checked against
   what each setting expects.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import datetime
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, save, table  # noqa: E402
from serve_load import Server, bucket_sizes  # noqa: E402

QUESTIONS = [
    "Name three rivers in Europe and one fact about each.",
    "Explain what a hash table is in two sentences.",
    "Write a short poem about the sea at night.",
    "What are the main differences between TCP and UDP?",
    "Give me a recipe for a simple tomato soup.",
    "Why is the sky blue? Answer briefly.",
    "List four uses of a paperclip that are not holding paper.",
    "Summarise the plot of a detective story you invent.",
]
CALL_TIMEOUT = 900.0


def _png_url(h: int, w: int, seed: int) -> str:
    from PIL import Image

    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _text_messages(i: int, tag: str) -> list[dict]:
    """Request ``i`` of a round; ``tag`` (the round) opens the prompt, so no request shares
    a reusable prefix with an earlier round's (each prefills its whole prompt)."""
    return [{"role": "system", "content": f"Request {tag}.{i}."}, {"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]


# -- 1. HTTP vs the engine alone ------------------------------------------------------------

def engine_round(pipe, n: int, tokens: int, tag: str) -> tuple[float, int]:
    """N concurrent requests through ``Pipeline.submit`` (no HTTP): (seconds, tokens)."""
    def one(i):
        seq = pipe.submit(messages=_text_messages(i, tag), max_new_tokens=tokens)
        for _ in seq.pieces():
            pass
        return len(seq.result.token_ids)

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        counts = list(pool.map(one, range(n), timeout=CALL_TIMEOUT))
    return time.perf_counter() - t0, sum(counts)


def http_round(server: Server, model: str, n: int, tokens: int, tag: str) -> tuple[float, int]:
    """N concurrent streamed requests through the server (one ``openai`` client each)."""
    def one(i):
        client = server.client()
        stream = client.chat.completions.create(model=model, messages=_text_messages(i, tag), max_tokens=tokens,
                                                temperature=0, stream=True, stream_options={"include_usage": True})
        used = None
        with stream:
            for chunk in stream:
                if chunk.usage is not None:
                    used = chunk.usage.completion_tokens
        if used is None:
            raise RuntimeError("the stream ended without usage")
        return used

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        counts = list(pool.map(one, range(n), timeout=CALL_TIMEOUT))
    return time.perf_counter() - t0, sum(counts)


# -- 2. the second turn ---------------------------------------------------------------------

def streamed_ttft(client, model: str, messages: list[dict], tokens: int) -> tuple[float, str]:
    """(time to the first chunk with text, the whole answer) of one streamed request."""
    t0, ttft, pieces = time.perf_counter(), None, []
    with client.chat.completions.create(model=model, messages=messages, max_tokens=tokens, temperature=0,
                                        stream=True) as stream:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                ttft = ttft if ttft is not None else time.perf_counter() - t0
                pieces.append(chunk.choices[0].delta.content)
    if ttft is None:
        raise RuntimeError("the stream gave no text")
    return ttft, "".join(pieces)


def two_turns(server: Server, model: str, size: tuple[int, int], seed: int, tokens: int) -> dict:
    client = server.client()
    url = _png_url(*size, seed=seed)
    first = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                          {"type": "text", "text": "Describe this image."}]}]
    ttft1, answer = streamed_ttft(client, model, first, tokens)
    second = first + [{"role": "assistant", "content": answer},
                      {"role": "user", "content": "What colours stand out in it?"}]
    ttft2, _ = streamed_ttft(client, model, second, tokens)
    return {"turn1_ttft_s": ttft1, "turn2_ttft_s": ttft2}


def counter(server: Server, prefix: str) -> float:
    return sum(v for k, v in server.metrics().items() if k.startswith(prefix))


# (label, extra server flags, vision-cache hits expected per second turn, prefix reuse expected)
TURN_SETTINGS = [
    ("vision cache + prefix reuse (defaults)", [], 1, True),
    ("vision cache only (`--no-prefix-reuse`)", ["--no-prefix-reuse"], 1, False),
    ("neither (`--vision-cache-mb 0 --no-prefix-reuse`)", ["--vision-cache-mb", 0, "--no-prefix-reuse"], 0, False),
]


def measure_turns(server: Server, model: str, size, rounds: int, tokens: int, seed: int, hits_per_turn: int,
                  reuse: bool) -> dict:
    hits0 = counter(server, "qwen3vl_vision_cache_hits")
    reused0 = counter(server, "qwen3vl_prefix_reused_tokens")
    runs = [two_turns(server, model, size, seed=seed + r, tokens=tokens) for r in range(rounds)]
    hits = counter(server, "qwen3vl_vision_cache_hits") - hits0
    reused = counter(server, "qwen3vl_prefix_reused_tokens") - reused0
    if hits != hits_per_turn * rounds or (reused > 0) != reuse:
        raise SystemExit(f"unexpected caching: {hits} vision-cache hits, {reused} reused prompt tokens in {rounds} rounds")
    return {"runs": runs, "cache_hits": hits, "reused_tokens": reused}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", required=True, type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clients", default="1,2,4,8", help="concurrent clients per level")
    ap.add_argument("--tokens", type=int, default=32, help="completion tokens per request (level runs)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--turn-rounds", type=int, default=3, help="two-turn conversations per cache setting (0: none)")
    ap.add_argument("--turn-tokens", type=int, default=8, help="completion tokens per turn")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1,2 clients, 8 tokens, 1 round")
    ap.add_argument("--out-name", default=None, help="results/<name>.{json,md} (default: serve_bench_<date>)")
    args = ap.parse_args(argv)
    if args.quick:
        args.clients, args.tokens, args.rounds, args.turn_rounds, args.turn_tokens = "1,2", 8, 1, 1, 4
    levels = sorted({int(c) for c in args.clients.split(",")})
    sizes = bucket_sizes(args.bundle)
    size = (448, 448) if (448, 448) in sizes else sizes[0]

    from qwen3vl_compile import Pipeline

    started = datetime.datetime.now().astimezone()
    log_dir = Path(tempfile.mkdtemp(prefix="serve_bench-"))
    common = ["--threads", args.threads, "--max-batch", max(levels), "--log-level", "warning"]
    t_run = time.perf_counter()
    results: dict = {"levels": {}, "turns": {}}
    print(f"loading the engine alone and the server ({args.bundle}) ...", flush=True)
    with Pipeline.load(args.bundle, threads=args.threads, max_batch=max(levels)) as pipe, \
            Server(args.bundle, common, log_dir / "server.log", start_timeout=600, api_key=None,
                   client_timeout=CALL_TIMEOUT) as server:
        model = server.model()
        # warm-up: one request each (first-run allocations, the prefill path, the HTTP stack)
        engine_round(pipe, 1, 4, "warm-up")
        http_round(server, model, 1, 4, "warm-up")
        runs = {n: {"engine": [], "http": []} for n in levels}
        for r in range(args.rounds):
            for n in levels:
                tag = f"{r}.{n}"
                for system, fn in (("engine", lambda: engine_round(pipe, n, args.tokens, "engine" + tag)),
                                   ("http", lambda: http_round(server, model, n, args.tokens, "http" + tag))):
                    secs, toks = fn()
                    runs[n][system].append({"seconds": secs, "tokens": toks, "tok_s": toks / secs})
                    print(f"round {r + 1}/{args.rounds} N={n} {system}: {toks} tokens in {secs:.2f} s "
                          f"= {toks / secs:.2f} tok/s", flush=True)
        for n in levels:
            med = {s: statistics.median(x["tok_s"] for x in runs[n][s]) for s in ("engine", "http")}
            results["levels"][n] = {"runs": runs[n], "engine_tok_s": med["engine"], "http_tok_s": med["http"],
                                    "ratio": med["http"] / med["engine"]}
        pipe.close()
        label, _, hits, reuse = TURN_SETTINGS[0]
        if args.turn_rounds:
            results["turns"][label] = measure_turns(server, model, size, args.turn_rounds, args.turn_tokens, 100,
                                                    hits, reuse)
    for i, (label, flags, hits, reuse) in enumerate(TURN_SETTINGS[1:] if args.turn_rounds else [], start=1):
        with Server(args.bundle, [*common, *flags], log_dir / f"turns{i}.log", start_timeout=600, api_key=None,
                    client_timeout=CALL_TIMEOUT) as server:
            model = server.model()
            http_round(server, model, 1, 4, "warm-up")
            results["turns"][label] = measure_turns(server, model, size, args.turn_rounds, args.turn_tokens,
                                                    100 + 100 * i, hits, reuse)
    for label, part in results["turns"].items():
        t1 = statistics.median(x["turn1_ttft_s"] for x in part["runs"])
        t2 = statistics.median(x["turn2_ttft_s"] for x in part["runs"])
        part.update(turn1_ttft_s=t1, turn2_ttft_s=t2, ratio=t2 / t1)
        print(f"{label}: turn 1 {t1:.2f} s, turn 2 {t2:.2f} s ({t2 / t1:.2f}x)", flush=True)

    level_rows = [[str(n), f"{v['engine_tok_s']:.2f}", f"{v['http_tok_s']:.2f}", f"{v['ratio']:.2f}"]
                  for n, v in results["levels"].items()]
    turn_rows = [[label, f"{p['turn1_ttft_s']:.2f} s", f"{p['turn2_ttft_s']:.2f} s", f"{p['ratio']:.2f}x"]
                 for label, p in results["turns"].items()]
    m = machine()
    md = (f"serve_bench {started:%Y-%m-%d %H:%M %Z}, {args.bundle.name}, {args.threads} threads, "
          f"{max(levels)} slots, {args.tokens} tokens per request, medians of {args.rounds} rounds; "
          f"{m.get('cpu', '')}\n\n"
          + table(level_rows, ["clients", "engine alone tok/s", "HTTP tok/s", "HTTP / engine"])
          + (f"\n\nSecond turn about the same {size[0]}x{size[1]} image (time to first token, streamed, "
             f"medians of {args.turn_rounds}):\n\n"
             + table(turn_rows, ["server", "turn 1", "turn 2", "turn 2 / turn 1"]) if turn_rows else ""))
    payload = {"date": started.isoformat(), "bundle": str(args.bundle), "threads": args.threads,
               "tokens": args.tokens, "rounds": args.rounds, "machine": m, "results": results,
               "wall_s": time.perf_counter() - t_run}
    save(args.out_name or f"serve_bench_{started:%Y-%m-%d}" + ("_quick" if args.quick else ""), payload, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
