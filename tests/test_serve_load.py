"""Load and fault test of ``qwen3vl-serve`` (issue 25): a real server process on a free loopback
port (always stopped), ``--max-batch 4``, 8 threads each with its own ``openai`` client sending
16 requests back to back: plain and streamed, 0, 1 or 2 images as ``data:`` URLs, different
prompts and ``max_tokens``; odd clients close their stream after the first chunk twice each.

None lost (a response for every request, every one a 200 at the server), none mixed up (each
greedy answer, its finish reason and token count equal the ones the same request got alone),
no error but the intended disconnects (each cancelled by the server, well before its token
budget), no sequence left active, waiting or in preparation afterwards, the server's RSS after
the run within 10% of its RSS after a warm-up round, no traceback in its log.

The workload and the server launcher are ``benchmarks/serve_load.py`` (the same run as a
benchmark). Bounded: every client call has a 60 s timeout, the run a deadline, the server
start a bounded wait for /health. About 25 s on 2 cores with the fp32 tiny bundle."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("starlette", reason="the [serve] extra (starlette, uvicorn) is not installed")
pytest.importorskip("uvicorn", reason="the [serve] extra (starlette, uvicorn) is not installed")
pytest.importorskip("openai", reason="the openai client (the [test] extra) is not installed")
pytest.importorskip("httpx", reason="httpx (the [test] extra) is not installed")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import serve_load  # noqa: E402

CLIENTS, REQUESTS, MAX_BATCH = 8, 16, 4
DEADLINE_S = 150


@pytest.mark.slow
def test_eight_clients_sixteen_requests_none_lost_none_mixed_up(vision_bundle, tmp_path):
    # Vision cache off: every image of every request goes through the vision graph, concurrently.
    res = serve_load.measure(vision_bundle, CLIENTS, REQUESTS, MAX_BATCH, warmup=4, threads=1,
                             log_path=tmp_path / "server.log", deadline_s=DEADLINE_S, vision_cache_mb=0)
    summary, server = res["summary"], res["server"]
    print(summary, server, res["rss_warm_bytes"], res["rss_after_bytes"])

    # The workload is what it says: mixed, and the distinct requests have distinct answers.
    records = res["records"]
    jobs = [r.job for r in records]
    assert {j.stream for j in jobs} == {True, False}
    assert {len(serve_load.SPECS[j.spec].images) for j in jobs if j.spec >= 0} == {0, 1, 2}
    solo = [r.text for r in res["solo"]]
    assert all(solo) and len(set(solo)) == len(solo), solo

    # None lost, none mixed up, no error but the intended disconnects.
    assert res["problems"] == []
    assert len(records) == CLIENTS * REQUESTS and summary["errors"] == 0
    disconnects = summary["disconnected"]
    assert disconnects == 8 and summary["completed"] == CLIENTS * REQUESTS - disconnects
    expected_ok = CLIENTS * REQUESTS  # a disconnected stream got its 200 before it went away
    assert server["ok_responses"] == expected_ok and server["non_200"] == 0, server

    # Each disconnect cancelled its sequence long before its budget; every slot freed.
    assert server["cancelled"] == disconnects, server
    overshoot = server["generated_tokens"] - summary["completion_tokens"]
    assert 0 <= overshoot < disconnects * serve_load.DISCONNECT_TOKENS // 4, server
    m = res["metrics_after"]
    assert (m["qwen3vl_active_sequences"], m["qwen3vl_waiting_sequences"], m["qwen3vl_preparing_requests"]) == (0, 0, 0)

    # Memory: the run leaves the server within 10% of its size after the warm-up.
    warm, after = res["rss_warm_bytes"], res["rss_after_bytes"]
    assert abs(after - warm) <= 0.10 * warm, (warm, after)

    assert res["exit_code"] == 0 and not res["traceback_in_log"], (tmp_path / "server.log").read_text()
    assert summary["requests_per_s"] > 0 and summary["ttft_p50_s"] <= summary["ttft_p95_s"]
