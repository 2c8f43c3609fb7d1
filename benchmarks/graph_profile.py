"""Where a vision bucket graph spends its time: ONNX Runtime's per-node profile summed by op
type, for several graphs of the same bucket side by side (e.g. fp32 and ``--vision-precision
int8``), on the same random input.

    python benchmarks/graph_profile.py --graph fp32=B/vision_448.onnx --graph int8=V8/vision_448.onnx \
        --threads 2 --runs 3 --name graph_profile_448

Each graph runs once to warm up, then ``--runs`` times with profiling on; per op type the median
over runs of the summed kernel times is reported, with its share of the run and, for the
matrix products, the rate in GFLOP/s (2 * M * K * N per node, from the shapes in the profile).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, save, table  # noqa: E402

MATMULS = {"MatMul", "Gemm", "MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "FusedMatMul"}


def _flops(args: dict) -> float:
    """2*M*K*N of one matrix-product node: K from its first input, M*N from its output (the
    profile gives no shapes for initializers). 0 when the event carries no shapes."""
    try:
        a = list(next(iter(args["input_type_shape"][0].values())))
        out = list(next(iter(args["output_type_shape"][0].values())))
    except (KeyError, IndexError, StopIteration, AttributeError):
        return 0.0
    return 2.0 * float(np.prod(out)) * a[-1] if a and out else 0.0


def profile(path: Path, threads: int, runs: int) -> dict[str, dict[str, float]]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    with tempfile.TemporaryDirectory(prefix="graph-profile-") as tmp:
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "p")
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        inp = sess.get_inputs()[0]
        x = np.random.default_rng(11).standard_normal([int(d) for d in inp.shape]).astype(np.float32)
        for _ in range(runs + 1):
            sess.run(None, {inp.name: x})
        events = json.loads(Path(sess.end_profiling()).read_text())
    run_ts = sorted(e["ts"] for e in events if e.get("name") == "model_run")
    run_dur = [e["dur"] / 1000 for e in sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])]
    per_run: list[dict[str, list[float]]] = [dict() for _ in run_ts]
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        i = max(j for j, t in enumerate(run_ts) if t <= e["ts"])
        op = e["args"].get("op_name", "?")
        ms, fl = per_run[i].setdefault(op, [0.0, 0.0])
        per_run[i][op] = [ms + e["dur"] / 1000, fl + (_flops(e["args"]) if op in MATMULS else 0.0)]
    timed = per_run[1:]  # the first run is the warm-up
    ops = sorted({op for d in timed for op in d})
    out = {op: {"ms": statistics.median(d.get(op, [0.0, 0.0])[0] for d in timed),
                "gflop": statistics.median(d.get(op, [0.0, 0.0])[1] for d in timed) / 1e9} for op in ops}
    out["(model_run)"] = {"ms": statistics.median(run_dur[1:]), "gflop": 0.0}
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--graph", action="append", required=True, metavar="LABEL=PATH")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--name", default="graph_profile")
    args = ap.parse_args()
    graphs = dict(g.split("=", 1) for g in args.graph)
    results = {label: profile(Path(p), args.threads, args.runs) for label, p in graphs.items()}
    ops = sorted({op for r in results.values() for op in r if op != "(model_run)"},
                 key=lambda op: -max(r.get(op, {"ms": 0})["ms"] for r in results.values()))
    rows = []
    for op in ["(model_run)", *ops]:
        row = [op]
        for r in results.values():
            v = r.get(op)
            if v is None:
                row.append("–")
                continue
            share = f" ({100 * v['ms'] / r['(model_run)']['ms']:.0f}%)" if op != "(model_run)" else ""
            rate = f", {v['gflop'] / (v['ms'] / 1000):.0f} GFLOP/s" if v["gflop"] else ""
            row.append(f"{v['ms']:.0f} ms{share}{rate}")
        rows.append(row)
    m = machine()
    date = datetime.date.today().isoformat()
    text = "\n".join([f"Per-op-type kernel time, median of {args.runs} profiled runs, {args.threads} threads; {date}, "
                      f"{m['cpu']} ({', '.join(m['cpu_flags'])}), {m['cores']} cores", "",
                      table(rows, ["op type", *results])])
    print(text)
    save(args.name, {"date": date, "machine": m, "threads": args.threads, "runs": args.runs, "graphs": graphs,
                     "ops": results}, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
