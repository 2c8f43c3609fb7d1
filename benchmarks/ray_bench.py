"""Ray on one machine: ``qwen3vl-serve --ray`` with 1 and 2 replicas, and ``qwen3vl-eval --ray``
with 1 and 2 actors, side by side in one run.

    python benchmarks/ray_bench.py --work /tmp/ray-bench            # about 8 minutes on 2 cores

The trained ``tiny`` model at fp32 with one 256x256 bucket (compiled into ``--work`` once) and
``--items`` held-out items (``qwen3vl_compile.presets.shapes``, its held-out seed) written there.
Every configuration gets the same cores: ``--cores`` (default: all) split evenly, so 1 replica
(actor) has ``--cores`` ONNX Runtime threads and Ray CPUs, 2 have half each. Configurations
alternate in rounds (1, 2, 1, 2, ...); medians over ``--rounds``.

1. **Serve** (a fresh ``qwen3vl-serve OUT --ray --replicas N`` per round, on a free loopback
   port, always stopped): ``--clients`` threads, each with its own ``openai`` client, send
   ``--requests`` requests back to back (the request mix of ``serve_load.py``: 0, 1 or 2 images,
   different prompts and ``max_tokens``, streamed every other one), after one warm-up request per
   client. Requests/s = requests / wall time of the load; every answer must equal the answer the
   same request got in every other configuration and round (none mixed up). RSS (``VmRSS``) of
   each replica's process after the load, and of the rest (the server's process, Ray's
   processes, Serve's controller and proxy).
2. **Batch** (``qwen3vl-eval OUT ITEMS --ray --actors N --on-miss fit``, a fresh process and local
   Ray instance each round): items/s = items / the command's wall time (Ray's start and the
   actors' loads included), the median seconds of one item in an actor (from the answers
   file), and the peak RSS of each actor's process (sampled every 0.25 s). The answers must equal item for item across configurations and rounds.

The system load average (1 minute) is recorded at the start and the end: on a shared machine
other work inflates the times of every configuration alike (they alternate).
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import datetime
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, machine, save, table  # noqa: E402
from serve_load import SPECS, Job, Server, call, images  # noqa: E402

CONFIGS = (1, 2)  # replicas / actors


# -- what is measured: processes -------------------------------------------------------------

def _descendants(pid: int):
    import psutil

    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def _rss_by_role(pid: int, role: str) -> tuple[list[int], int]:
    """(RSS of each process whose title names ``role``, RSS of all the others) under ``pid``."""
    import psutil

    mine, rest = [], 0
    for p in _descendants(pid):
        try:
            rss, title = p.memory_info().rss, " ".join(p.cmdline())
        except psutil.Error:  # gone meanwhile
            continue
        if role in title:
            mine.append(rss)
        else:
            rest += rss
    return mine, rest


class PeakRss:
    """Peak RSS of each process under ``pid`` whose title names ``role``, sampled in a thread."""

    def __init__(self, pid: int, role: str, every: float = 0.25):
        self.peaks: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(pid, role, every), daemon=True)
        self._thread.start()

    def _run(self, pid, role, every):
        import psutil

        while not self._stop.wait(every):
            try:
                procs = _descendants(pid)
            except psutil.Error:
                return
            for p in procs:
                try:
                    if role in " ".join(p.cmdline()):
                        self.peaks[p.pid] = max(self.peaks.get(p.pid, 0), p.memory_info().rss)
                except psutil.Error:
                    pass

    def stop(self) -> list[int]:
        self._stop.set()
        self._thread.join(5)
        return sorted(self.peaks.values())


# -- 1. serve ----------------------------------------------------------------------------------

def serve_round(bundle: Path, replicas: int, threads: int, clients: int, requests: int, urls, log: Path) -> dict:
    args = ["--ray", "--replicas", replicas, "--threads", threads, "--max-batch", 4, "--log-level", "warning"]
    with Server(bundle, args, log, start_timeout=300, api_key=None, client_timeout=120) as server:
        model = server.model()
        jobs = [[Job(c, j, (5 * c + j) % len(SPECS), (c + j) % 2 == 0, False) for j in range(requests)]
                for c in range(clients)]

        def run(part):
            def one(client_jobs):
                client = server.client()
                return [call(client, model, job, urls) for job in client_jobs]

            with concurrent.futures.ThreadPoolExecutor(clients) as pool:
                return [r for f in [pool.submit(one, j) for j in part] for r in f.result(timeout=900)]

        run([j[:1] for j in jobs])  # warm-up: one request per client (not timed)
        t0 = time.perf_counter()
        records = run(jobs)
        wall = time.perf_counter() - t0
        replica_rss, rest_rss = _rss_by_role(server.proc.pid, "ServeReplica:")
        rc = server.stop(timeout=120)
    errors = [r.error for r in records if not r.ok]
    return {"replicas": replicas, "threads": threads, "requests": len(records), "wall_s": wall,
            "requests_per_s": len(records) / wall, "errors": errors, "exit_code": rc,
            "completion_tokens": sum(r.completion_tokens or 0 for r in records),
            "answers": [(f"{SPECS[r.job.spec].prompt} ({'streamed' if r.job.stream else 'plain'})", r.text)
                        for r in records if r.ok],
            "replica_rss_bytes": replica_rss, "other_rss_bytes": rest_rss}


# -- 2. batch ----------------------------------------------------------------------------------

def batch_round(bundle: Path, items: Path, actors: int, threads: int, out: Path) -> dict:
    cmd = [sys.executable, "-m", "qwen3vl_compile.runtime.eval", str(bundle), str(items), "--ray", "--actors", str(actors),
           "--threads", str(threads), "--on-miss", "fit", "--max-new-tokens", "8", "--json", "-q", "--output", str(out)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    peak = PeakRss(proc.pid, "MapWorker")
    stdout, stderr = proc.communicate(timeout=900)
    wall = time.perf_counter() - t0
    actor_rss = peak.stop()
    if proc.returncode != 0:
        raise SystemExit(f"qwen3vl-eval --ray --actors {actors} failed ({proc.returncode}): {stderr.strip()[-500:]}")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    report = json.loads(stdout)
    return {"actors": actors, "threads": threads, "items": len(rows), "wall_s": wall, "items_per_s": len(rows) / wall,
            "item_s_median": statistics.median(r["seconds"] for r in rows),
            "failed": len(report.get("failed", [])), "exact": report["bundle"]["exact"],
            "predictions": [r["prediction"] for r in rows], "actor_peak_rss_bytes": actor_rss}


# -- the run -----------------------------------------------------------------------------------

def prepare(work: Path, n_items: int) -> tuple[Path, Path]:
    """The trained tiny bundle (fp32, one 256 bucket) and the held-out items, made once in ``work``."""
    from qwen3vl_compile.cli import main as compile_main
    from qwen3vl_compile.presets.shapes import HELDOUT_SEED, write_set

    bundle = work / "tiny-fp32-256"
    if not (bundle / "manifest.json").exists():
        print(f"compiling {bundle} ...", flush=True)
        if compile_main(["--model", "tiny", "--precision", "fp32", "--buckets", "256", "-o", str(bundle), "-q"]) != 0:
            raise SystemExit("the tiny bundle did not compile")
    items = work / f"heldout-{n_items}" / "items.jsonl"
    if not items.exists():
        write_set(items.parent, HELDOUT_SEED, n_items)
    return bundle, items


def _mib(values) -> str:
    return "/".join(f"{v / 2**20:.0f}" for v in values) if values else "-"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="where the bundle and items are made (kept for reuse)")
    ap.add_argument("--items", type=int, default=128, help="held-out items per batch run")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--requests", type=int, default=8, help="requests per client per serve round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--cores", type=int, default=os.cpu_count(), help="cores given to each configuration, split evenly")
    ap.add_argument("--out-name", default=None, help="results/<name>.{json,md} (default: ray_bench_<date>)")
    args = ap.parse_args(argv)
    if args.cores < max(CONFIGS):
        raise SystemExit(f"--cores must be at least {max(CONFIGS)}")

    started = datetime.datetime.now().astimezone()
    load_start = os.getloadavg()
    t_run = time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)
    bundle, items = prepare(args.work, args.items)
    urls = images(bundle)
    serve_runs: dict[int, list] = {n: [] for n in CONFIGS}
    batch_runs: dict[int, list] = {n: [] for n in CONFIGS}
    for r in range(args.rounds):
        for n in CONFIGS:
            res = serve_round(bundle, n, args.cores // n, args.clients, args.requests, urls,
                              args.work / f"serve-{r}-{n}.log")
            serve_runs[n].append(res)
            print(f"round {r + 1}/{args.rounds} serve, {n} replica(s): {res['requests_per_s']:.2f} requests/s, "
                  f"{len(res['errors'])} errors, replicas {_mib(res['replica_rss_bytes'])} MiB", flush=True)
        for n in CONFIGS:
            res = batch_round(bundle, items, n, args.cores // n, args.work / f"answers-{r}-{n}.jsonl")
            batch_runs[n].append(res)
            print(f"round {r + 1}/{args.rounds} batch, {n} actor(s): {res['items_per_s']:.2f} items/s "
                  f"({res['item_s_median'] * 1000:.0f} ms per item), actors {_mib(res['actor_peak_rss_bytes'])} MiB",
                  flush=True)
    load_end = os.getloadavg()

    # None mixed up: the same request (or item) got the same answer in every configuration and round.
    texts = collections.defaultdict(set)
    for runs in serve_runs.values():
        for res in runs:
            for key, text in res["answers"]:
                texts[key].add(text)
    serve_differ = sorted(k for k, v in texts.items() if len(v) > 1)
    predictions = {tuple(res["predictions"]) for runs in batch_runs.values() for res in runs}
    problems = [f"serve: {k} answered differently across runs" for k in serve_differ]
    problems += ["batch: the answers differ across runs"] if len(predictions) > 1 else []
    problems += [f"serve, {n} replica(s): {e}" for n, runs in serve_runs.items() for res in runs for e in res["errors"]]
    problems += [f"batch, {n} actor(s): {res['failed']} failed items" for n, runs in batch_runs.items()
                 for res in runs if res["failed"]]

    def med(runs, key):
        return statistics.median(x[key] for x in runs)

    summary = {
        "serve": {n: {"requests_per_s": med(runs, "requests_per_s"), "wall_s": med(runs, "wall_s"),
                      "replica_rss_bytes": runs[-1]["replica_rss_bytes"], "other_rss_bytes": runs[-1]["other_rss_bytes"]}
                  for n, runs in serve_runs.items()},
        "batch": {n: {"items_per_s": med(runs, "items_per_s"), "item_s_median": med(runs, "item_s_median"),
                      "wall_s": med(runs, "wall_s"), "actor_peak_rss_bytes": runs[-1]["actor_peak_rss_bytes"]}
                  for n, runs in batch_runs.items()},
    }
    s1, b1 = summary["serve"][1], summary["batch"][1]
    serve_rows = [[f"{n} x {args.cores // n}", f"{v['requests_per_s']:.2f}", f"{v['requests_per_s'] / s1['requests_per_s']:.2f}x",
                   f"{v['wall_s']:.1f} s", _mib(v["replica_rss_bytes"]), f"{v['other_rss_bytes'] / 2**20:.0f}"]
                  for n, v in summary["serve"].items()]
    batch_rows = [[f"{n} x {args.cores // n}", f"{v['items_per_s']:.2f}", f"{v['items_per_s'] / b1['items_per_s']:.2f}x",
                   f"{v['item_s_median'] * 1000:.0f} ms", f"{v['wall_s']:.1f} s", _mib(v["actor_peak_rss_bytes"])]
                  for n, v in summary["batch"].items()]
    m = machine()
    requests = args.clients * args.requests
    md = (f"ray_bench {started:%Y-%m-%d %H:%M %Z}: {m['cores']} cores ({m['cpu']}), the trained tiny model at fp32 "
          f"(one 256 bucket), each configuration on {args.cores} cores split evenly (replicas/actors x ONNX Runtime "
          f"threads and Ray CPUs each), configurations alternating, medians of {args.rounds} rounds. System load "
          f"average (1 min) {load_start[0]:.2f} at the start, {load_end[0]:.2f} at the end"
          + (" (the machine was shared: other work ran beside this one)" if max(load_start[0], load_end[0]) > 0.5 else "")
          + f".\n\n`qwen3vl-serve OUT --ray --replicas N`: {args.clients} clients (`openai`) x {args.requests} requests "
          f"({requests} per round, mixed text / 1-2 images, plain and streamed):\n\n"
          + table(serve_rows, ["replicas x threads", "requests/s", "vs 1", "load wall", "RSS per replica (MiB)",
                               "RSS of the rest (MiB)"])
          + f"\n\n`qwen3vl-eval OUT ITEMS --ray --actors N --on-miss fit`: {args.items} held-out items, 8 tokens "
          "each (items/s over the command's wall time, Ray's start and the actors' loads included):\n\n"
          + table(batch_rows, ["actors x threads", "items/s", "vs 1", "one item in an actor (median)", "command wall",
                               "peak RSS per actor (MiB)"])
          + (f"\n\nProblems: {len(problems)}: " + "; ".join(problems[:10]) if problems else
             "\n\nEvery request and item got the same answer in every configuration and round; no error."))
    payload = {"date": started.isoformat(), "machine": m, "cores_per_configuration": args.cores,
               "load_average_start": load_start, "load_average_end": load_end, "bundle": str(bundle),
               "items": args.items, "clients": args.clients, "requests_per_client": args.requests, "rounds": args.rounds,
               "summary": summary, "problems": problems, "wall_s": time.perf_counter() - t_run,
               "serve_runs": {n: [{k: v for k, v in x.items() if k != "answers"} for x in runs]
                              for n, runs in serve_runs.items()},
               "batch_runs": {n: [{k: v for k, v in x.items() if k != "predictions"} for x in runs]
                              for n, runs in batch_runs.items()}}
    save(args.out_name or f"ray_bench_{started:%Y-%m-%d}", payload, md)
    print(md)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
