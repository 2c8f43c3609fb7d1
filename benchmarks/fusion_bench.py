"""Lever check: FuseSiblingMatMulNBitsPass (q/k/v and gate/up as one MatMulNBits each) on the
INT4 decoder, timed against the unfused decoder round-robin in one run.

    python benchmarks/fusion_bench.py --decoder OUT/decoder.onnx --threads 2
    python benchmarks/fusion_bench.py --model qwen3-vl-4b --work /tmp/w --threads 2   # builds it first

Prints prefill time for a ``--prompt``-token prompt and decode tokens/s over ``--steps``
steps for both, and checks that their logits are identical (the fusion is exact).
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, save, table  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--decoder", type=Path, help="an INT4 decoder.onnx (from a bundle)")
    ap.add_argument("--model", default=None, help="build the INT4 decoder of this model first (with --work)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/fusion-bench"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=300)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--name", default="fusion_4b_local", help="results file name")
    args = ap.parse_args()

    import onnx_ir as ir

    from qwen3vl_compile.passes.base import run_passes
    from qwen3vl_compile.passes.fuse_sibling_matmulnbits import FuseSiblingMatMulNBitsPass
    from qwen3vl_compile.runtime.decoder_session import DecoderSession

    args.work.mkdir(parents=True, exist_ok=True)
    plain = args.decoder
    if args.model:
        from qwen3vl_compile.model.checkpoint import Checkpoint, resolve_model_source
        from qwen3vl_compile.export.decoder import build_decoder

        plain = args.work / "decoder.onnx"
        if not plain.is_file():
            t = time.perf_counter()
            build_decoder(Checkpoint.open(resolve_model_source(args.model, log=print)), plain, precision="int4", logits="last")
            print(f"built {plain} in {time.perf_counter() - t:.0f} s", flush=True)
    fused = args.work / "decoder_fused.onnx"
    model, reports = run_passes(ir.load(plain), [FuseSiblingMatMulNBitsPass()])
    ir.save(model, fused, external_data=fused.name + ".data")
    del model
    print(reports[0].stats, flush=True)

    def session(path):
        return DecoderSession(path, max_length=args.prompt + args.steps + 8, threads=args.threads)

    systems = {"unfused (q/k/v, gate/up separate)": session(plain), "FuseSiblingMatMulNBitsPass": session(fused)}
    hidden = next(iter(systems.values())).hidden
    rng = np.random.default_rng(0)
    embeds = rng.standard_normal((1, args.prompt, hidden)).astype(np.float32)
    positions = np.broadcast_to(np.arange(args.prompt), (3, 1, args.prompt)).copy()
    times = {k: {"prefill": [], "decode": []} for k in systems}
    logits = {}
    for r in range(args.repeats + 1):  # round-robin, first round a warm-up
        for name, s in systems.items():
            t = time.perf_counter()
            out = [s.prefill(embeds, positions)]
            prefill = time.perf_counter() - t
            t = time.perf_counter()
            for i in range(args.steps):
                out.append(s.step(embeds[:, i:i + 1], np.full((3, 1, 1), args.prompt + i, np.int64)))
            decode = args.steps / (time.perf_counter() - t)
            logits[name] = out
            if r:
                times[name]["prefill"].append(prefill)
                times[name]["decode"].append(decode)
    a, b = logits.values()
    identical = all(np.array_equal(x, y) for x, y in zip(a, b))
    base = next(iter(times.values()))
    rows = []
    for name, t in times.items():
        p, d = statistics.median(t["prefill"]), statistics.median(t["decode"])
        rows.append([name, f"{p:.2f}", f"{d:.2f}", f"{statistics.median(base['prefill']) / p:.3f}x",
                     f"{d / statistics.median(base['decode']):.3f}x"])
    m = machine()
    text = "\n".join([
        f"INT4 decoder {plain.name} ({reports[0].stats}), {args.threads} threads, median of {args.repeats}; "
        f"{datetime.date.today()}, {m['cpu']}, {m['cores']} cores",
        "",
        table(rows, ["decoder", f"prefill {args.prompt} tok (s)", f"decode tok/s ({args.steps} steps)", "prefill speed", "decode speed"]),
        "",
        f"logits identical: {identical}",
    ])
    print(text)
    save(args.name, {"date": str(datetime.date.today()), "machine": m, "threads": args.threads, "times": times,
                     "identical": identical, "stats": reports[0].stats}, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
