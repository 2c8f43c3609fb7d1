"""``--vision-precision int8``: what it costs in numbers and what it buys in time, one run.

    python benchmarks/vision_int8.py --model qwen3-vl-4b --buckets 448,896 --threads 2

1. Activation granularity (the choice the int8 pass makes), on the trained ``tiny`` tower's
   any-size graph at four grids: worst relative error of every output against the unpatched
   Hugging Face tower in fp32, for int8 weights with activations quantized per token (what
   ``--vision-precision int8`` builds) and per tensor (ONNX Runtime's fused
   DynamicQuantizeMatMul), and for tiny-random.
2. Speed at ``--model``'s vision size, per bucket: PyTorch eager fp32 (unpatched tower), the
   compiled fp32 bucket graph, the int8 graph (per token) and the per-tensor variant, all in
   ONNX Runtime with ``--threads`` threads, median of ``--runs`` interleaved runs after one
   warm-up; and the int8 graph's parity gate (the compile's own check) at that size.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved_medians, machine, save, scratch_dir, table  # noqa: E402

GRIDS = [(1, 20, 14), (1, 16, 36), (1, 30, 30), (1, 8, 12)]


VARIANTS = {  # name -> (activations, keep attention inputs fp32)
    "per-token": ("per-token", True),
    "per-tensor": ("per-tensor", True),
    "per-token, qkv int8 too": ("per-token", False),
    "per-tensor, qkv int8 too": ("per-tensor", False),
}


def quantized_copy(src: Path, dst: Path, variant: str) -> dict:
    import onnx_ir as ir

    from qwen3vl_compile.passes.quantize_gemm_int8 import QuantizeGemmInt8Pass

    mode, keep = VARIANTS[variant]
    model = ir.load(src)
    stats = QuantizeGemmInt8Pass(mode, keep_attention_inputs=keep)(model).stats
    ir.save(model, dst, external_data=f"{dst.name}.data")
    return stats


def granularity(models: list[str], work: Path) -> tuple[list[list[str]], list[str], dict]:
    """Worst relative error per case: the any-size graph at GRIDS, the 448 bucket at 3 seeds."""
    from qwen3vl_compile.buckets import parse_bucket
    from qwen3vl_compile.bundle.goldens import pixel_values_from_u8
    from qwen3vl_compile.export import vision_dynamic as vd
    from qwen3vl_compile.export.vision import export_vision_bucket, random_pixel_values
    from qwen3vl_compile.export.vision_common import reference_outputs, split_outputs
    from qwen3vl_compile.model.checkpoint import Checkpoint, resolve_model_source
    from qwen3vl_compile.runtime.session import ort_session

    bucket = parse_bucket("448")
    columns = ["x".join(map(str, g[1:])) for g in GRIDS] + [f"448 seed {s}" for s in (1, 2, 3)]
    rows, record = [], {}
    for name in models:
        visual = Checkpoint.open(resolve_model_source(name)).load_vision_tower()
        d = work / f"gran-{name}"
        d.mkdir()
        dyn = d / vd.export_vision_dynamic(visual, d).file
        static = d / export_vision_bucket(visual, bucket, d).file
        patch_dim = visual.patch_embed.proj.weight[0].numel()
        cases = []
        for g in GRIDS:
            x = pixel_values_from_u8(vd.random_pixel_u8([g], patch_dim, 1))
            cases.append(("dyn", {"pixel_values": x, "image_grid_thw": np.array([g], np.int64)},
                          reference_outputs(visual, x, [g])))
        for seed in (1, 2, 3):
            x = random_pixel_values(bucket, seed)
            cases.append(("static", {"pixel_values": x}, reference_outputs(visual, x, [bucket.grid_thw])))
        for variant in VARIANTS:
            sessions = {}
            for kind, src in (("dyn", dyn), ("static", static)):
                dst = d / f"{kind}-{variant.replace(' ', '_').replace(',', '')}.onnx"
                quantized_copy(src, dst, variant)
                sessions[kind] = ort_session(dst, 0)
            errs = []
            for kind, feeds, ref in cases:
                out = split_outputs(*sessions[kind].run(None, feeds))
                errs.append(max(float(np.abs(out[k] - ref[k]).max() / np.abs(ref[k]).max()) for k in ref))
            record[f"{name}/{variant}"] = dict(zip(columns, errs))
            rows.append([name, variant, *(f"{e:.4f}" for e in errs)])
            print(rows[-1], flush=True)
    return rows, columns, record


def speed(model: str, buckets: list[str], threads: int, runs: int, work: Path) -> tuple[list[list[str]], dict]:
    import torch

    from qwen3vl_compile.buckets import parse_bucket
    from qwen3vl_compile.export.vision import export_vision_bucket, random_pixel_values, verify_vision_bucket
    from qwen3vl_compile.model.checkpoint import Checkpoint, resolve_model_source
    from qwen3vl_compile.runtime.session import ort_session

    torch.set_num_threads(threads)
    visual = Checkpoint.open(resolve_model_source(model, log=print)).load_vision_tower()
    rows, record = [], {}
    for name in buckets:
        bucket = parse_bucket(name)
        d = work / f"speed-{name}"
        d.mkdir()
        fp32 = d / export_vision_bucket(visual, bucket, d).file
        paths = {"fp32": fp32}
        for variant in ("per-token", "per-tensor"):
            paths[variant] = d / f"int8-{variant}.onnx"
            print(variant, quantized_copy(fp32, paths[variant], variant), flush=True)
        gate = verify_vision_bucket(paths["per-token"], visual, bucket, threads=threads, precision="int8")
        worst = gate.worst_rel
        x = random_pixel_values(bucket, seed=11)
        xt, grid = torch.from_numpy(x), torch.tensor([list(bucket.grid_thw)])

        def eager():
            with torch.no_grad():
                visual(xt, grid_thw=grid)

        systems = {"eager": eager}
        for key, p in paths.items():
            s = ort_session(p, threads)
            systems[key] = (lambda s=s: s.run(None, {"pixel_values": x}))
        t = interleaved_medians(systems, runs)
        record[name] = {"seconds": t, "int8_gate_max_rel": worst, "int8_gate_passed": gate.passed}
        labels = {"eager": "PyTorch eager fp32", "fp32": "ONNX Runtime fp32 (compiled bucket)",
                  "per-token": "ONNX Runtime int8, per-token activations (--vision-precision int8)",
                  "per-tensor": "ONNX Runtime int8, per-tensor activations (not offered)"}
        for key, label in labels.items():
            rows.append([name, label, f"{t[key]:.3f}", f"{t[key] / t['eager']:.2f}"])
        print(rows[-4:], f"int8 gate max_rel {worst:.4f} passed={gate.passed}", flush=True)
    return rows, record


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen3-vl-4b")
    ap.add_argument("--buckets", default="448,896")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--accuracy-models", default="tiny,tiny-random")
    ap.add_argument("--name", default=None, help="results file name (default vision_int8_<model>)")
    args = ap.parse_args()

    work = scratch_dir("vision-int8-")
    g_rows, g_cols, g_rec = granularity([m for m in args.accuracy_models.split(",") if m], work)
    s_rows, s_rec = speed(args.model, args.buckets.split(","), args.threads, args.runs, work)

    date = datetime.date.today().isoformat()
    m = machine()
    gate = ", ".join(f"{b}: {r['int8_gate_max_rel']:.4f}" for b, r in s_rec.items())
    text = "\n".join([
        f"Vision int8, {date}, {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB, {args.threads} threads",
        "",
        "Worst relative error of any output vs the unpatched fp32 tower, any-size graph, int8 weights:",
        "",
        table(g_rows, ["model", "int8 variant", *g_cols]),
        "",
        f"{args.model} vision, median of {args.runs} interleaved runs:",
        "",
        table(s_rows, ["bucket", "system", "latency (s)", "ratio to eager"]),
        "",
        f"int8 bucket graph's parity gate at {args.model} size (random weights), worst max_rel: {gate}",
    ])
    print(text)
    save(args.name or f"vision_int8_{args.model}",
         {"date": date, "machine": m, "model": args.model, "threads": args.threads, "runs": args.runs,
          "granularity": g_rec, "speed": s_rec}, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
