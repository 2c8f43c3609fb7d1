"""Batched decode throughput of the engine, beside the INT4 kernel's own ceiling, in one run.

    python benchmarks/engine_throughput.py --bundle /work/bench-scratch/4b-int4 --threads 2 \
        --scratch /work/bench-scratch
    python benchmarks/engine_throughput.py --bundle TINY_BUNDLE --quick      # < 1 minute, smoke

Workload (issue 24): ``max(N)`` different 300-token prompts are prefilled once, one slot
each, into one :class:`~qwen3vl_compile.runtime.engine.Engine` (KV pool of ``max(N)`` slots).
A *round* at N decodes K batched greedy steps over slots ``[0, N)`` through
:meth:`Engine.decode` (one embedding call, MRoPE positions, one decoder run over the pool),
every row starting again after its 300 cached prompt tokens (rows past a slot's length are
never read, so rounds can overwrite each other's generated tokens). Aggregate tokens/s at N
= ``N * K / time``.

The *kernel ceiling*: every ``com.microsoft`` MatMulNBits node of the bundle's decoder.onnx
(same weights, same K, N, bits, block_size, accuracy_level; lm_head included), copied into
one graph whose activations are inputs ``[M, 1, K]``, timed alone at M = N rows on a session
made by the project's session factory with the same threads. Ceiling tokens/s at M =
``M / time per call``. Rounds run round-robin (each repeat: for each N, one engine round,
then the ceiling at M = N), so background load spreads over all of them; medians reported.

Speed-up at N = tokens/s at N / tokens/s at 1, for the engine and for the ceiling; the
target is engine speed-up >= 90% of the ceiling's at 4 and 8. A per-step breakdown (embedding
call, positions and mask host work, decoder run) is timed after the rounds, and the pool's
bytes per slot at the bundle's context length and at 4096 / 8192 are computed.
"""

from __future__ import annotations

import argparse
import bisect
import datetime
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, save, table  # noqa: E402

PROMPT = 300
MIB, GIB = 2**20, 2**30


def load_engine(bundle: Path, threads: int, max_batch: int, max_length: int | None):
    from qwen3vl_compile.bundle.check import open_checked
    from qwen3vl_compile.bundle.manifest import BundleFiles
    from qwen3vl_compile.runtime.engine import Engine, EngineOptions

    manifest = open_checked(bundle, skip_hash_check=True)
    files = BundleFiles.of_manifest(bundle, manifest)
    engine = Engine(files, manifest, EngineOptions(threads=threads, max_batch=max_batch, max_length=max_length), log=print)
    return engine, manifest


def ceiling_graph(decoder_path: Path, out_dir: Path) -> tuple[Path, dict]:
    """Every MatMulNBits of ``decoder_path`` (with its own initializers and attributes) in one
    graph; activation ``x_K [M, 1, K]`` per distinct K, every node's output a graph output."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(decoder_path), load_external_data=True)
    inits = {t.name: t for t in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits" and n.domain == "com.microsoft"]
    if not nodes:
        raise SystemExit(f"{decoder_path}: no com.microsoft MatMulNBits node (not an INT4 decoder)")
    new_nodes, used, ks, outputs, shapes = [], {}, set(), [], {}
    for i, n in enumerate(nodes):
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        k, nn = int(attrs["K"]), int(attrs["N"])
        ks.add(k)
        key = (k, nn, int(attrs.get("bits", 4)), int(attrs["block_size"]), int(attrs.get("accuracy_level", 0)))
        shapes[key] = shapes.get(key, 0) + 1
        rest = list(n.input[1:])
        for name in rest:
            if name and name not in inits:
                raise SystemExit(f"{decoder_path}: MatMulNBits {n.name} input {name!r} is not an initializer")
            if name:
                used[name] = inits[name]
        out = f"y_{i}"
        new_nodes.append(helper.make_node("MatMulNBits", [f"x_{k}", *rest], [out], name=n.name or f"mmnb_{i}",
                                          domain="com.microsoft", **attrs))
        outputs.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, ["m", 1, nn]))
    inputs = [helper.make_tensor_value_info(f"x_{k}", TensorProto.FLOAT, ["m", 1, k]) for k in sorted(ks)]
    graph = helper.make_graph(new_nodes, "matmulnbits_ceiling", inputs, outputs, list(used.values()))
    opsets = [o for o in model.opset_import if o.domain in ("", "ai.onnx", "com.microsoft")]
    out_model = helper.make_model(graph, opset_imports=opsets, ir_version=model.ir_version)
    del model, inits
    path = out_dir / "matmulnbits_ceiling.onnx"
    onnx.save(out_model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="matmulnbits_ceiling.data", size_threshold=1024)
    weight_bytes = sum(t.ByteSize() for t in used.values())
    info = {"nodes": len(nodes), "weight_bytes": weight_bytes,
            "shapes": [{"K": k, "N": n, "bits": b, "block_size": bs, "accuracy_level": al, "count": c}
                       for (k, n, b, bs, al), c in sorted(shapes.items())]}
    return path, info


class Ceiling:
    def __init__(self, path: Path, threads: int):
        from qwen3vl_compile.runtime.session import ort_session

        self.session = ort_session(path, threads)
        self.ks = [int(i.shape[2]) for i in self.session.get_inputs()]
        rng = np.random.default_rng(1)
        self.feeds = {m: {f"x_{k}": rng.standard_normal((m, 1, k)).astype(np.float32) for k in self.ks} for m in (1, 2, 4, 8)}
        self.times: dict[int, list[float]] = {}

    def time(self, m: int, calls: int) -> None:
        feed = self.feeds.setdefault(m, {f"x_{k}": np.ones((m, 1, k), np.float32) for k in self.ks})
        for _ in range(calls):
            t = time.perf_counter()
            self.session.run(None, feed)
            self.times.setdefault(m, []).append(time.perf_counter() - t)


class Bench:
    """The engine with ``max(ns)`` prompts prefilled; :meth:`round` times K steps at N."""

    def __init__(self, engine, n_max: int, prompt: int, seed: int = 0):
        self.engine = engine
        vocab = int(engine.pool.session.get_outputs()[0].shape[-1])
        high = min(vocab, 150000)  # below the special and vision-pad tokens
        rng = np.random.default_rng(seed)
        self.prompt = prompt
        self.first, self.prefill_s = [], []
        for slot in range(n_max):
            ids = rng.integers(0, high, prompt)[None]  # a different prompt per slot
            embeds, deep = engine.embed(ids)
            pos = np.broadcast_to(np.arange(prompt, dtype=np.int64), (3, 1, prompt)).copy()
            t = time.perf_counter()
            logits = engine.prefill(slot, embeds, pos, deep)
            self.prefill_s.append(time.perf_counter() - t)
            self.first.append(int(np.argmax(logits)))
            print(f"  prefill slot {slot}: {self.prefill_s[-1]:.2f} s", flush=True)
        self.times: dict[int, list[float]] = {}

    def round(self, n: int, steps: int) -> None:
        tokens, lengths, deltas = list(self.first[:n]), [self.prompt] * n, [0] * n
        t = time.perf_counter()
        for _ in range(steps):
            logits = self.engine.decode(tokens, lengths, deltas)
            tokens = np.argmax(logits, axis=-1).tolist()
            lengths = [x + 1 for x in lengths]
        self.times.setdefault(n, []).append(time.perf_counter() - t)

    def breakdown(self, n: int, steps: int) -> dict:
        """One round split into its parts, as Engine.decode does them (ms per step)."""
        from qwen3vl_compile.runtime.rope_index import decode_positions

        e = self.engine
        tokens, lengths, deltas = list(self.first[:n]), [self.prompt] * n, [0] * n
        parts = {"embed_ms": 0.0, "positions_ms": 0.0, "decoder_run_ms": 0.0, "argmax_ms": 0.0}
        for _ in range(steps):
            t0 = time.perf_counter()
            embeds, _ = e.embed(np.asarray(tokens, np.int64).reshape(-1, 1))
            t1 = time.perf_counter()
            positions = np.concatenate([decode_positions(x, d) for x, d in zip(lengths, deltas)], axis=1)
            t2 = time.perf_counter()
            logits = e.pool.run(0, lengths, embeds, positions)[:, -1]
            t3 = time.perf_counter()
            tokens = np.argmax(logits, axis=-1).tolist()
            lengths = [x + 1 for x in lengths]
            t4 = time.perf_counter()
            for k, dt in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                parts[k] += 1000 * dt / steps
        return parts


def profile_ops(decoder_path: Path, threads: int, ns, length: int, runs: int, out_dir: Path) -> dict:
    """ONNX Runtime's per-node profile of one decode step at each N (slots [0, N) holding
    ``length`` cached tokens each; their values do not change the time), summed by op type:
    ``{N: {op_type: ms per step}}``, median over ``runs`` profiled steps after one warm-up.
    The profiling session is made here (the session factory has no profiling switch), with
    the factory's threading settings."""
    import onnxruntime as ort

    from qwen3vl_compile.runtime.decoder_session import DecoderPool

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.enable_profiling = True
    opts.profile_file_prefix = str(out_dir / "ort_profile")
    session = ort.InferenceSession(str(decoder_path), opts, providers=["CPUExecutionProvider"])
    pool = DecoderPool(decoder_path, max_batch=max(ns), max_length=length + runs + 4, session=session)
    labels = []  # N of each model run, None for warm-ups
    for n in ns:
        for r in range(runs + 1):
            embeds = np.zeros((n, 1, pool.hidden), np.float32)
            pool.run(0, [length + r] * n, embeds, np.full((3, n, 1), length + r, np.int64))
            labels.append(n if r else None)
    events = json.loads(Path(session.end_profiling()).read_text())
    run_events = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    assert len(run_events) == len(labels), (len(run_events), len(labels))
    per_run = [dict() for _ in run_events]
    starts = [e["ts"] for e in run_events]
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        i = bisect.bisect_right(starts, e["ts"]) - 1
        op = e["args"].get("op_name", "?")
        per_run[i][op] = per_run[i].get(op, 0.0) + e["dur"] / 1000
    out = {}
    for n in ns:
        runs_n = [(per_run[i], run_events[i]["dur"] / 1000) for i, lab in enumerate(labels) if lab == n]
        ops = sorted({op for d, _ in runs_n for op in d})
        out[n] = {op: statistics.median(d.get(op, 0.0) for d, _ in runs_n) for op in ops}
        out[n]["(model_run)"] = statistics.median(t for _, t in runs_n)
    return out


def ops_table(ops: dict, ns) -> str:
    """The op types that take >= 1% of a step at the largest N, ms per step at each N."""
    big = max(ns)
    total = ops[big]["(model_run)"]
    keep = [op for op, ms in sorted(ops[big].items(), key=lambda kv: -kv[1]) if op != "(model_run)" and ms >= 0.01 * total]
    rows = [[op, *(f"{ops[n].get(op, 0.0):.1f}" for n in ns), f"{ops[big].get(op, 0.0) / max(ops[ns[0]].get(op, 0.0), 1e-9):.2f}x"]
            for op in keep]
    rows.append(["whole run (model_run)", *(f"{ops[n]['(model_run)']:.1f}" for n in ns),
                 f"{ops[big]['(model_run)'] / ops[ns[0]]['(model_run)']:.2f}x"])
    return table(rows, ["op type (ms per step)", *(f"N={n}" for n in ns), f"N={big} / N={ns[0]}"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", required=True, type=Path, help="an INT4 bundle (embedding + decoder graphs)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ns", default="1,2,4,8", help="concurrent sequences (default 1,2,4,8)")
    ap.add_argument("--steps", type=int, default=32, help="batched decode steps per round")
    ap.add_argument("--repeats", type=int, default=5, help="rounds per N (median)")
    ap.add_argument("--ceiling-calls", type=int, default=8, help="ceiling calls per M per repeat")
    ap.add_argument("--prompt", type=int, default=PROMPT)
    ap.add_argument("--max-length", type=int, default=None, help="pool slot length (default: the bundle's context)")
    ap.add_argument("--scratch", type=Path, default=None, help="where the ceiling graph is written (default: a temp dir)")
    ap.add_argument("--name", default=None, help="results name (default engine_throughput_<preset>)")
    ap.add_argument("--label", default=None, help="model label for the table (default: the manifest's source)")
    ap.add_argument("--quick", action="store_true", help="smoke: 4 steps, 2 repeats, 2 ceiling calls (tiny bundle)")
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--profile", action="store_true", help="also an ONNX Runtime per-op profile of one step at each N")
    ap.add_argument("--profile-only", action="store_true", help="only the per-op profile (saved as <name>_ops)")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.repeats, args.ceiling_calls = 4, 2, 2
    ns = [int(x) for x in args.ns.split(",")]
    t_start = time.perf_counter()

    manifest = json.loads((args.bundle / "manifest.json").read_text())
    decoder_path = args.bundle / manifest["graphs"]["decoder"]["file"]
    label = args.label or str(manifest.get("source", {}).get("preset") or Path(str(manifest.get("source", {}).get("path", "?"))).name)
    if args.scratch:
        args.scratch.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.TemporaryDirectory(dir=args.scratch, prefix="ceiling-")
    name = args.name or f"engine_throughput_{label.replace(':', '-')}"
    if args.profile_only:
        ops = profile_ops(decoder_path, args.threads, ns, args.prompt, max(2, args.repeats), Path(tmp.name))
        m = machine()
        text = (f"Per-op profile of one decode step, {label} INT4, {args.threads} threads, {args.prompt} cached tokens per "
                f"sequence, median of {max(2, args.repeats)} steps; {datetime.date.today().isoformat()}, {m['cpu']} "
                f"({m['isa']}), {m['cores']} cores\n\n" + ops_table(ops, ns))
        print(text)
        if not args.no_save:
            save(name + "_ops", {"date": datetime.date.today().isoformat(), "machine": m, "threads": args.threads,
                                 "label": label, "ops_ms": {str(k): v for k, v in ops.items()}}, text)
        tmp.cleanup()
        return 0
    print("building the MatMulNBits ceiling graph ...", flush=True)
    t = time.perf_counter()
    ceiling_path, ceiling_info = ceiling_graph(decoder_path, Path(tmp.name))
    print(f"  {ceiling_info['nodes']} nodes, {ceiling_info['weight_bytes'] / 1e9:.2f} GB, {time.perf_counter() - t:.0f} s", flush=True)
    ceiling = Ceiling(ceiling_path, args.threads)

    print("loading the engine ...", flush=True)
    engine, manifest = load_engine(args.bundle, args.threads, max(ns), args.max_length)
    pool = engine.pool
    print(f"prefilling {max(ns)} prompts of {args.prompt} tokens ...", flush=True)
    bench = Bench(engine, max(ns), args.prompt)

    # Warm-up: one short round and a few ceiling calls per N.
    for n in ns:
        bench.round(n, 2)
        ceiling.time(n, 2)
    bench.times.clear()
    ceiling.times.clear()
    for r in range(args.repeats):
        for n in ns:
            bench.round(n, args.steps)
            ceiling.time(n, args.ceiling_calls)
        print(f"  repeat {r + 1}/{args.repeats}: " + ", ".join(
            f"N={n} {n * args.steps / bench.times[n][-1]:.2f} tok/s" for n in ns), flush=True)
    breakdown = {n: bench.breakdown(n, max(2, args.steps // 4)) for n in ns}

    eng_tps = {n: n * args.steps / statistics.median(bench.times[n]) for n in ns}
    ceil_tps = {n: n / statistics.median(ceiling.times[n]) for n in ns}
    step_ms = {n: 1000 * statistics.median(bench.times[n]) / args.steps for n in ns}
    mm_ms = {n: 1000 * statistics.median(ceiling.times[n]) for n in ns}
    base = ns[0]
    rows, results = [], {}
    for n in ns:
        e_up = eng_tps[n] / eng_tps[base]
        c_up = ceil_tps[n] / ceil_tps[base]
        ratio = e_up / c_up
        results[n] = {"engine_tok_s": eng_tps[n], "engine_step_ms": step_ms[n], "engine_speedup": e_up,
                      "ceiling_tok_s": ceil_tps[n], "ceiling_call_ms": mm_ms[n], "ceiling_speedup": c_up,
                      "ratio": ratio, "breakdown_ms": breakdown[n],
                      "engine_runs_s": bench.times[n], "ceiling_runs_s": ceiling.times[n]}
        met = "" if n < 4 else (" yes" if ratio >= 0.9 else " **no**")
        rows.append([str(n), f"{eng_tps[n]:.2f}", f"{step_ms[n]:.0f}", f"{e_up:.2f}x", f"{mm_ms[n]:.0f}",
                     f"{c_up:.2f}x", f"{ratio:.2f}{met}",
                     f"{breakdown[n]['embed_ms']:.1f} / {breakdown[n]['positions_ms'] + breakdown[n]['argmax_ms']:.1f} / "
                     f"{breakdown[n]['decoder_run_ms']:.0f} / {breakdown[n]['decoder_run_ms'] - mm_ms[n]:.0f}"])
    header = ["N seqs", "engine tok/s", "ms/step", "engine speed-up", "MatMulNBits ms/call (M=N)",
              "ceiling speed-up", "engine/ceiling (>= 0.9)",
              "step ms: embed / host / decoder run / run - MatMulNBits"]

    per_slot = {L: pool.pool_bytes(pool.num_layers, pool.kv_heads, pool.head_dim, 1, L)
                for L in sorted({engine.max_length, 4096, 8192})}
    pool_nbytes, max_batch, max_length = pool.nbytes, engine.max_batch, engine.max_length
    kv_shape = f"{pool.num_layers} layers x {pool.kv_heads} KV heads x {pool.head_dim}"
    prefill_s = bench.prefill_s
    ops = None
    if args.profile:  # a third copy of the weights: free the engine's and the ceiling's first
        del bench, engine, pool, ceiling
        import gc

        gc.collect()
        ops = profile_ops(decoder_path, args.threads, ns, args.prompt, 3, Path(tmp.name))
    date = datetime.date.today().isoformat()
    m = machine()
    spec = manifest["graphs"]["decoder"]["spec"]
    wall = time.perf_counter() - t_start
    lines = [
        f"Batched decode, {label} INT4, {args.threads} threads; {date}, {m['cpu']} ({m['isa']}), {m['cores']} cores, "
        f"{m['ram_gib']} GiB; {args.prompt}-token prompts (different per sequence), {args.steps} greedy steps per round, "
        f"median of {args.repeats} round-robin rounds; ceiling = the decoder's {ceiling_info['nodes']} MatMulNBits nodes "
        f"({ceiling_info['weight_bytes'] / 1e9:.2f} GB, same weights and attributes) timed alone at M = N rows, "
        f"median of {args.repeats * args.ceiling_calls} calls. Whole run {wall / 60:.1f} min.",
        "",
        table(rows, header),
        "",
        "MatMulNBits shapes: " + ", ".join(
            f"{s['count']}x K={s['K']} N={s['N']} (bits {s['bits']}, block {s['block_size']}, acc {s['accuracy_level']})"
            for s in ceiling_info["shapes"]),
        f"prefill {args.prompt} tokens, one slot: median {statistics.median(prefill_s):.2f} s",
        f"KV pool per slot (float32 K+V, {kv_shape}): " + ", ".join(
            f"{L} tokens {b / MIB:.0f} MiB" for L, b in per_slot.items())
        + f"; this run's pool: {max_batch} slots x {max_length} = {pool_nbytes / GIB:.2f} GiB (pages touched only as filled)",
    ]
    if ops:
        lines += ["", ops_table(ops, ns)]
    text = "\n".join(lines)
    print(text)
    payload = {"ops_ms": {str(k): v for k, v in ops.items()} if ops else None, "date": date, "machine": m, "threads": args.threads, "label": label, "prompt": args.prompt,
               "steps": args.steps, "repeats": args.repeats, "ceiling_calls": args.ceiling_calls,
               "context_length": spec.get("context_length"), "pool_max_length": max_length,
               "ceiling": ceiling_info, "results": {str(k): v for k, v in results.items()},
               "prefill_s": prefill_s, "pool_bytes_per_slot": {str(k): v for k, v in per_slot.items()},
               "wall_s": wall, "quick": args.quick}
    if not args.no_save:
        save(name, payload, text)
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
