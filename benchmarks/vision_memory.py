"""Peak memory of the any-size vision graph against the PyTorch fallback, per image size.

    python benchmarks/vision_memory.py --work /tmp/vm [--model tiny] [--sizes 1024,2048,max]

Compiles MODEL with ``--buckets 448,dynamic --target ort-genai`` (so the bundle has both the
per-image any-size graph and the multi-image one onnxruntime-genai uses), then for each square
image size runs, each in a fresh process: the per-image graph (what ``qwen3vl-run`` uses), the
multi-image graph on the same single image, and the PyTorch fallback; reports the process's
peak RSS (``ru_maxrss``, the bundle loaded and the image preprocessed included) and the
vision wall time. ``max`` is the largest square image whose tokens fit the bundle's context.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, save, table  # noqa: E402

CHILD = r"""
import json, resource, sys, time
import numpy as np
from PIL import Image
from qwen3vl_compile.bundle.check import open_checked
from qwen3vl_compile.runtime.preprocess import ProcessorConfig, preprocess
from qwen3vl_compile.runtime.vision import VisionEncoder, run_dynamic
bundle, size, system = sys.argv[1], int(sys.argv[2]), sys.argv[3]
m = open_checked(bundle, skip_hash_check=True)
from qwen3vl_compile.runtime.session import ort_session
def session(p):
    return ort_session(p, 2)
img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))
p = preprocess(img, ProcessorConfig.from_dict(m["processor"]))
grid = np.array([p.grid_thw], np.int64)
enc = VisionEncoder(bundle, m, session)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
if system == "fallback":
    feats, _ = enc._fallback_model().run(p.pixel_values, p.grid_thw)
else:
    s = session(f"{bundle}/{system}.onnx")
    feats, _ = run_dynamic(s, p.pixel_values, grid, system == "vision_dynamic")
wall = time.perf_counter() - t
print(json.dumps({"grid": list(p.grid_thw), "tokens": int(feats.shape[0]), "wall_s": wall,
                  "rss_before_encode_mib": before / 1024, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

SYSTEMS = ("vision_dynamic", "fallback", "vision_dynamic_multi")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--model", default="tiny-random")
    ap.add_argument("--sizes", default="1024,2048,max")
    ap.add_argument("--skip", default="vision_dynamic_multi@max",
                    help="system@size pairs not to run (default: the multi-image graph at the largest size, whose "
                         "block-diagonal mask and scores need more memory than a 24 GB machine has)")
    args = ap.parse_args()
    bundle = args.work / "bundle"
    if not (bundle / "manifest.json").is_file():
        args.work.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "qwen3vl_compile.cli", "--model", args.model, "--buckets", "448,dynamic",
                        "--target", "ort-genai", "--precision", "fp32", "-o", str(bundle), "-q"], check=True)
    m = json.loads((bundle / "manifest.json").read_text())
    context = int(m["graphs"]["decoder"]["spec"]["context_length"])
    sizes = []
    for s in args.sizes.split(","):
        if s == "max":  # tokens = (side / 32)^2 must stay below the context (with room for a prompt)
            sizes.append(int(math.sqrt(context - 64)) * 32)
        else:
            sizes.append(int(s))
    skip = set(args.skip.split(",")) - {""}
    max_size = int(math.sqrt(context - 64)) * 32
    rows, out = [], {"date": datetime.date.today().isoformat(), "machine": machine(), "model": args.model, "runs": []}
    for size in sizes:
        res = {}
        for system in SYSTEMS:
            if f"{system}@{size}" in skip or (f"{system}@max" in skip and size == max_size):
                res[system] = {"error": "not run (--skip)"}
                continue
            p = subprocess.run([sys.executable, "-c", CHILD, str(bundle), str(size), system], capture_output=True, text=True)
            if p.returncode != 0:
                res[system] = {"error": (p.stderr.strip().splitlines() or ["?"])[-1][:200]}
            else:
                res[system] = json.loads(p.stdout.strip().splitlines()[-1])
            print(size, system, res[system], file=sys.stderr, flush=True)
        out["runs"].append({"size": size, **res})
        d, f = res.get("vision_dynamic", {}), res.get("fallback", {})
        mm = res.get("vision_dynamic_multi", {})
        ratio = d["peak_rss_mib"] / f["peak_rss_mib"] if "peak_rss_mib" in d and "peak_rss_mib" in f else float("nan")
        rows.append([f"{size}x{size}", d.get("tokens", "?"), f"{d.get('peak_rss_mib', float('nan')):.0f}",
                     f"{f.get('peak_rss_mib', float('nan')):.0f}", f"{ratio:.2f}x",
                     f"{mm['peak_rss_mib']:.0f}" if "peak_rss_mib" in mm else mm.get("error", "not run"),
                     f"{d.get('wall_s', float('nan')):.1f} / {f.get('wall_s', float('nan')):.1f}"])
    md = (f"Vision memory, {out['date']}, {out['machine']['cpu']}, model {args.model}, 2 threads; "
          "`python benchmarks/vision_memory.py`. Peak RSS of a fresh process that loads the bundle, preprocesses one "
          "image and runs the vision tower once.\n\n"
          + table(rows, ["image", "tokens", "any-size graph MiB", "PyTorch fallback MiB", "ratio",
                         "multi-image graph MiB (one image)", "vision s (graph / fallback)"]))
    save(f"vision_memory_{args.model}", out, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
