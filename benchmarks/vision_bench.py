"""Vision tower: PyTorch eager vs the compiled bucket graph in ONNX Runtime, side by side.

    python benchmarks/vision_bench.py --model qwen3-vl-4b --bucket 448 --threads 2

Steps, all in one run:
1. ``qwen3vl-compile --graphs vision --buckets B`` in a subprocess: wall time and peak RSS of
   the whole compile (export + passes + parity), and its parity figures.
2. The same bucket exported without the attention fusion ("plain export"), for the record.
3. Median latency over ``--runs`` runs (after one warm-up) of: PyTorch eager fp32 (unpatched
   Hugging Face tower), ONNX Runtime on the plain export, ONNX Runtime on the compiled graph
   (and on the same bucket compiled with ``--vision-precision int8``, given ``--int8 BUNDLE``),
   all with ``--threads`` threads, on the same random input.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved_medians, machine, run_timed, save, scratch_dir, table  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen3-vl-4b")
    ap.add_argument("--bucket", default="448")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--name", default=None, help="results file name (default vision_<model>_<bucket>)")
    ap.add_argument("--bundle", type=Path, default=None,
                    help="use this already compiled bundle (its manifest gives compile figures) instead of compiling")
    ap.add_argument("--no-plain", action="store_true", help="skip the plain-export row")
    ap.add_argument("--int8", type=Path, default=None, help="a bundle with this bucket compiled with --vision-precision int8")
    args = ap.parse_args()

    from qwen3vl_compile.runtime.session import ort_session
    import torch

    from qwen3vl_compile.buckets import parse_bucket
    from qwen3vl_compile.model.checkpoint import Checkpoint, resolve_model_source
    from qwen3vl_compile.export.vision import export_vision_bucket, random_pixel_values
    from qwen3vl_compile.passes.check_model import CheckModelPass
    from qwen3vl_compile.passes.cleanup import CleanupPass
    from qwen3vl_compile.passes.unify_index_types import UnifyIndexTypesPass

    bucket = parse_bucket(args.bucket)
    path = resolve_model_source(args.model, log=print)
    work = scratch_dir("vision-bench-")

    # 1. The compile, as a user runs it (or an existing bundle's record of it).
    if args.bundle:
        out = args.bundle
        manifest = json.loads((out / "manifest.json").read_text())
        compile_wall = sum(v for k, v in manifest["timings"].items() if k.endswith(f"vision_{bucket.name}") or "grid" in k and bucket.name in k)
        compile_rss = manifest["peak_rss_bytes"]
    else:
        out = work / "bundle"
        cmd = [sys.executable, "-m", "qwen3vl_compile.cli", "--model", args.model, "--buckets", args.bucket,
               "--graphs", "vision", "-o", str(out), "--threads", str(args.threads), "-q"]
        compile_wall, compile_rss, _ = run_timed(cmd)
        manifest = json.loads((out / "manifest.json").read_text())
    graph = f"vision_{bucket.name}"
    parity = manifest["parity"][graph]
    worst_rel = max(o["max_rel"] for case in parity["cases"].values() for o in case.values())
    export_seconds = manifest["graphs"][graph]["export"]["seconds"]

    torch.set_num_threads(args.threads)
    visual = Checkpoint.open(path).load_vision_tower()

    # 2. Plain export (no fusion), same patches and cleanup.
    if not args.no_plain:
        plain_dir = work / "plain"
        plain_dir.mkdir()
        rep = export_vision_bucket(visual, bucket, plain_dir, passes=(UnifyIndexTypesPass(), CleanupPass(), CheckModelPass()))

    # 3. Latencies.
    x = random_pixel_values(bucket, seed=11)
    xt = torch.from_numpy(x)
    grid = torch.tensor([list(bucket.grid_thw)])

    def eager():
        with torch.no_grad():
            visual(xt, grid_thw=grid)

    def session(p):
        return ort_session(p, args.threads)

    # Interleaved: one run of each system per round, so load from other processes spreads
    # over all of them instead of biasing one.
    systems = {"eager": eager}
    if not args.no_plain:
        s_plain = session(plain_dir / rep.file)
        systems["plain"] = lambda: s_plain.run(None, {"pixel_values": x})
    s_ours = session(out / f"{graph}.onnx")
    systems["ours"] = lambda: s_ours.run(None, {"pixel_values": x})
    if args.int8:
        s_int8 = session(args.int8 / f"{graph}.onnx")
        systems["int8"] = lambda: s_int8.run(None, {"pixel_values": x})
    times = interleaved_medians(systems, args.runs)
    t_eager, t_ours = times["eager"], times["ours"]
    t_plain, t_int8 = times.get("plain"), times.get("int8")

    rows = [["PyTorch eager fp32 (transformers)", f"{t_eager:.3f}", "1.00"]]
    if t_plain is not None:
        rows.append(["ONNX Runtime, plain export", f"{t_plain:.3f}", f"{t_plain / t_eager:.2f}"])
    rows.append(["ONNX Runtime, qwen3vl-compile", f"{t_ours:.3f}", f"{t_ours / t_eager:.2f}"])
    if t_int8 is not None:
        rows.append(["ONNX Runtime, qwen3vl-compile --vision-precision int8", f"{t_int8:.3f}", f"{t_int8 / t_eager:.2f}"])
    date = datetime.date.today().isoformat()
    m = machine()
    md = [
        f"Vision {args.model} bucket {bucket.name} (grid {bucket.grid_thw[1]}x{bucket.grid_thw[2]}), "
        f"{args.threads} threads, median of {args.runs}; {date}, {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB",
        "",
        table(rows, ["system", "latency (s)", "ratio to eager"]),
        "",
        f"compile of this bucket (export + passes + parity) {compile_wall:.1f} s, torch.onnx export {export_seconds:.1f} s, "
        + (f"peak RSS of the whole bundle's compile {compile_rss / 2**30:.2f} GiB" if args.bundle else f"peak RSS {compile_rss / 2**30:.2f} GiB")
        + f"; parity max relative error {worst_rel:.2e}",
    ]
    text = "\n".join(md)
    print(text)
    save(
        args.name or f"vision_{args.model}_{bucket.name}",
        {
            "date": date, "machine": m, "model": args.model, "bucket": bucket.to_json(), "threads": args.threads,
            "runs": args.runs, "eager_s": t_eager, "ort_plain_s": t_plain, "ort_compiled_s": t_ours, "ort_int8_s": t_int8,
            "compile_wall_s": compile_wall, "compile_peak_rss_bytes": compile_rss, "export_s": export_seconds,
            "parity_max_rel": worst_rel,
        },
        text,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
