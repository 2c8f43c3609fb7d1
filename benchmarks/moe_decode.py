"""MoE decode speed: Qwen3-VL-30B-A3B against Qwen3-VL-4B, INT4, on this machine.

The whole 30B-A3B (60 GB of bf16 weights) does not fit this disk and memory budget, so both
models are measured on layer slices and extrapolated, labelled as such: for each shape, INT4
decoders of its first 4 and first 8 text layers are built from one random-weight checkpoint
(``NAME:8``) and timed round-robin; a decode step costs ``a + b * layers`` (a: embedding-free
overhead, final norm and lm_head; b: one layer), so the full depth is ``a + b * L``.

    python benchmarks/moe_decode.py --work /tmp/moe [--threads 2] [--steps 64]
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved_medians, machine, save, table  # noqa: E402

SHAPES = {"qwen3-vl-30b-a3b": 48, "qwen3-vl-4b": 36}
DEPTHS = (4, 8)
PROMPT = 300


def log(msg: str) -> None:
    print(f"[{datetime.datetime.now():%H:%M:%S}] {msg}", file=sys.stderr, flush=True)


class Decode:
    """A decoder session with a 300-token prompt prefilled; ``step_block`` runs ``steps``
    decode steps (random embeddings; the speed does not depend on values)."""

    def __init__(self, path: Path, threads: int, steps: int):
        from qwen3vl_compile.runtime.decoder_session import DecoderSession

        self.s = DecoderSession(path, max_length=PROMPT + 4096, threads=threads)
        rng = np.random.default_rng(0)
        self.prompt = (0.02 * rng.standard_normal((1, PROMPT, self.s.hidden))).astype(np.float32)
        self.step_in = (0.02 * rng.standard_normal((1, 1, self.s.hidden))).astype(np.float32)
        self.steps = steps
        t = time.perf_counter()
        self.s.prefill(self.prompt, np.broadcast_to(np.arange(PROMPT), (3, 1, PROMPT)).copy(), None)
        self.prefill_s = time.perf_counter() - t

    def step_block(self) -> None:
        if self.s.length + self.steps > self.s.max_length:
            self.s.length = PROMPT
        for _ in range(self.steps):
            self.s.step(self.step_in, np.full((3, 1, 1), self.s.length, np.int64))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    from qwen3vl_compile.model.checkpoint import Checkpoint, resolve_model_source
    from qwen3vl_compile.export.decoder import build_decoder

    systems, builds = {}, {}
    for shape in SHAPES:
        ck = Checkpoint.open(resolve_model_source(f"{shape}:{max(DEPTHS)}", log=log))
        for n in DEPTHS:
            path = args.work / f"{shape}-{n}" / "decoder.onnx"
            if not path.is_file():
                log(f"building {shape} INT4, {n} layers")
                rep = build_decoder(ck, path, logits="last", context_length=PROMPT + 4096, layers=n)
                builds[f"{shape}:{n}"] = {"seconds": rep.details["seconds"]["total"], "bytes": rep.details["sizes"]["total"]}
            log(f"loading {shape}:{n}")
            systems[(shape, n)] = Decode(path, args.threads, args.steps)
    log("timing decode steps round-robin")
    med = interleaved_medians({k: v.step_block for k, v in systems.items()}, runs=args.runs)
    per_step = {k: med[k] / args.steps for k in systems}
    out = {"date": datetime.date.today().isoformat(), "machine": machine(), "threads": args.threads, "steps": args.steps,
           "runs": args.runs, "prompt": PROMPT, "builds": builds, "shapes": {}}
    rows = []
    for shape, layers in SHAPES.items():
        (n0, n1) = DEPTHS
        t0, t1 = per_step[(shape, n0)], per_step[(shape, n1)]
        b = (t1 - t0) / (n1 - n0)
        a = t0 - b * n0
        full = a + b * layers
        out["shapes"][shape] = {"step_s": {n: per_step[(shape, n)] for n in DEPTHS}, "per_layer_s": b, "overhead_s": a,
                                "layers": layers, "extrapolated_step_s": full, "extrapolated_tok_s": 1 / full,
                                "prefill_s": {n: systems[(shape, n)].prefill_s for n in DEPTHS}}
        rows.append([shape, f"{t0 * 1e3:.1f}", f"{t1 * 1e3:.1f}", f"{b * 1e3:.2f}", f"{a * 1e3:.1f}", layers,
                     f"{1 / full:.2f}"])
    moe, dense = (out["shapes"][s]["extrapolated_tok_s"] for s in SHAPES)
    out["ratio_moe_over_dense"] = moe / dense
    md = (f"MoE decode, {out['date']}, {out['machine']['cpu']}, {args.threads} threads, INT4 block 32, accuracy level 4, "
          f"after a {PROMPT}-token prefill; `python benchmarks/moe_decode.py`. Measured on 4- and 8-layer slices, "
          "full depth extrapolated (a + b x layers), not measured whole.\n\n"
          + table(rows, ["shape", "ms/step 4 layers", "ms/step 8 layers", "ms per layer", "ms overhead (lm_head...)",
                         "layers", "extrapolated tok/s"])
          + f"\n\n30B-A3B / 4B decode tokens/s: {out['ratio_moe_over_dense']:.2f}x")
    save("moe_decode", out, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
