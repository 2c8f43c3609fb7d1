"""What a bundle costs in answers: the trained ``tiny`` model on the synthetic held-out set,
every precision, every way of serving an image, onnxruntime-genai, and two ablations, in one run.

    python benchmarks/accuracy.py --work DIR [--n 600]

Writes the held-out set (``python -m qwen3vl_compile.presets.shapes``, a seed training never
used; image sizes on and off the training sizes), compiles one bundle per row, answers every
item greedily (``qwen3vl-eval``'s scoring: exact match, case-insensitive) and compares each
system with Hugging Face fp32 item for item. Results in ``benchmarks/results/accuracy.*``.

Rows:
- Hugging Face fp32 (the reference) and the bundle at fp32, fp16, INT4 block 32 / 128, INT4
  embedding (all images served by a bucket of their exact size);
- images through the any-size graph, the PyTorch fallback, ``fit`` (resized to the 256 bucket);
- the onnxruntime-genai target, run by onnxruntime-genai's own pipeline;
- ablations on the fp32 bundle: DeepStack dropped (the levels zeroed, what the public recipe
  ships) and vision features from a wrongly sized grid (height and width swapped; only
  non-square images are affected, so that row is scored on those).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, save, table  # noqa: E402

from qwen3vl_compile.cli import main as compile_main  # noqa: E402
from qwen3vl_compile.presets.materialize import PREPROCESSOR_CONFIG  # noqa: E402
from qwen3vl_compile.presets.shapes import HELDOUT_SEED, HELDOUT_SIZES, write_set  # noqa: E402
from qwen3vl_compile.runtime.preprocess import ProcessorConfig, smart_resize  # noqa: E402
from qwen3vl_compile.runtime.eval import SystemResult, answer_all, load_items, report, run_bundle, run_reference  # noqa: E402
from qwen3vl_compile.runtime.pipeline import Pipeline  # noqa: E402

SLICE = 60
# The sizes the held-out images become after the processor's resize (what a bucket must match).
_CFG = ProcessorConfig.from_dict(PREPROCESSOR_CONFIG)
SIZES = ",".join(f"{h}x{w}" for h, w in sorted({smart_resize(h, w, _CFG) for h, w in HELDOUT_SIZES}))
# name -> (compile arguments, serving on_miss)
BUNDLES = {
    "fp32": (["--precision", "fp32", "--buckets", SIZES], "error"),
    "fp16": (["--precision", "fp16", "--buckets", SIZES], "error"),
    "int4-b32": (["--precision", "int4", "--block-size", "32", "--buckets", SIZES], "error"),
    "int4-b128": (["--precision", "int4", "--block-size", "128", "--buckets", SIZES], "error"),
    "int4-emb": (["--precision", "int4", "--embedding-precision", "int4", "--buckets", SIZES], "error"),
    "vision-int8": (["--precision", "fp32", "--vision-precision", "int8", "--buckets", SIZES], "error"),
    "any-size": (["--precision", "fp32", "--buckets", "dynamic"], "fallback"),  # fallback = any-size graph here
    "fallback": (["--precision", "fp32", "--buckets", "64"], "fallback"),
    "fit": (["--precision", "fp32", "--buckets", "256"], "fit"),
    "ort-genai": (["--precision", "fp32", "--buckets", "dynamic", "--target", "ort-genai"], "error"),
}
LABELS = {
    "reference": "Hugging Face fp32 (reference)",
    "fp32": "bundle fp32, bucket per size",
    "fp16": "bundle fp16 decoder",
    "int4-b32": "bundle INT4, block 32 (default)",
    "int4-b128": "bundle INT4, block 128",
    "int4-emb": "bundle INT4 + INT4 embedding",
    "vision-int8": "fp32 decoder, int8 vision (`--vision-precision int8`)",
    "any-size": "fp32, any-size vision graph",
    "fallback": "fp32, PyTorch fallback vision",
    "fit": "fp32, fit to the 256 bucket",
    "ort-genai": "onnxruntime-genai pipeline (fp32)",
    "no-deepstack": "ablation: DeepStack dropped",
    "swapped-grid": "ablation: grid h/w swapped",
}


class _ZeroDeepStack:
    """The embedding session with its DeepStack output zeroed: the decoder then never sees
    the levels (what a DeepStack-less export amounts to)."""

    def __init__(self, session):
        self.session = session

    def run(self, names, feeds):
        outs = self.session.run(names, feeds)
        return [np.zeros_like(o) if n == "deepstack_embeds" else o for n, o in zip(names, outs)]


def _swap_grid(pipe: Pipeline) -> None:
    encode = pipe.vision.encode

    def swapped(pixel_values, grid_thw):
        t, h, w = grid_thw
        return encode(pixel_values, (t, w, h))

    pipe.vision.encode = swapped


def run_genai(bundle: Path, items, max_new_tokens: int, decode, threads: int) -> SystemResult:
    import onnxruntime_genai as og

    from qwen3vl_compile.runtime.chat import build_messages
    from qwen3vl_compile.runtime.genai import genai_greedy

    config = og.Config(str(bundle))
    opts = {"session_options": {"intra_op_num_threads": threads, "inter_op_num_threads": 1}}
    config.overlay(json.dumps({"model": {k: opts for k in ("decoder", "embedding", "vision")}}))
    model = og.Model(config)
    chat = Pipeline.load(bundle).chat
    return answer_all("ort-genai", lambda it: decode(genai_greedy(
        model, chat.render(build_messages(it.prompt, len(it.images))), it.images, max_new_tokens, chat.stop_ids)), items)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--n", type=int, default=600)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--reuse", action="store_true", help="keep bundles already compiled in --work by this script")
    ap.add_argument("--rows", default=None,
                    help="only these rows, comma-separated (e.g. fp32,vision-int8; the reference always runs, "
                         "no-deepstack and swapped-grid need fp32 and any-size); results then go to accuracy_<rows>")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    items_path = write_set(args.work / "heldout", HELDOUT_SEED, args.n)
    items = load_items(items_path)
    print(f"held-out set: {len(items)} items, sizes {SIZES}", flush=True)

    results: dict[str, SystemResult] = {}
    compile_s = {}
    rows_wanted = set(args.rows.split(",")) if args.rows else set(BUNDLES) | {"no-deepstack", "swapped-grid"}
    unknown = rows_wanted - set(BUNDLES) - {"no-deepstack", "swapped-grid"}
    if unknown:
        raise SystemExit(f"--rows: unknown {sorted(unknown)}; rows are {', '.join([*BUNDLES, 'no-deepstack', 'swapped-grid'])}")
    bundles = {k: v for k, v in BUNDLES.items() if k in rows_wanted or k == "fp32"
               or (k == "any-size" and "swapped-grid" in rows_wanted)}
    for name, (extra, _) in bundles.items():
        out = args.work / name
        if not (args.reuse and (out / "manifest.json").is_file()):
            t = time.perf_counter()
            rc = compile_main(["--model", "tiny", "-o", str(out), "--force", "-q", "--threads", str(args.threads), *extra])
            if rc != 0:
                raise SystemExit(f"compile {name} failed ({rc})")
            print(f"compiled {name} in {time.perf_counter() - t:.1f} s", flush=True)
        # Seconds per compile stage, as the bundle's manifest records them.
        compile_s[name] = json.loads((out / "manifest.json").read_text()).get("timings", {})

    decode = Pipeline.load(args.work / "fp32").chat.decode
    results["reference"] = run_reference("tiny", items, args.max_new_tokens, decode)
    print("reference done", flush=True)
    for name, (_, on_miss) in bundles.items():
        if name not in rows_wanted:
            continue
        if name == "ort-genai":
            results[name] = run_genai(args.work / name, items, args.max_new_tokens, decode, args.threads)
        else:
            pipe = Pipeline.load(args.work / name, threads=args.threads, on_miss=on_miss)
            results[name] = run_bundle(pipe, items, args.max_new_tokens)
        print(f"{name} done", flush=True)
    if "no-deepstack" in rows_wanted:
        pipe = Pipeline.load(args.work / "fp32", threads=args.threads, on_miss="error")
        pipe.engine.embedding = _ZeroDeepStack(pipe.engine.embedding)
        results["no-deepstack"] = run_bundle(pipe, items, args.max_new_tokens)
    if "swapped-grid" in rows_wanted:
        pipe = Pipeline.load(args.work / "any-size", threads=args.threads, on_miss="fallback")
        _swap_grid(pipe)
        results["swapped-grid"] = run_bundle(pipe, items, args.max_new_tokens)

    ref = results["reference"]
    non_square = [i for i, it in enumerate(items) if any(_not_square(p) for p in it.images)]
    first = range(min(SLICE, len(items)))  # the items tests/test_trained_tiny.py reruns
    rows, payload = [], {}
    kinds = sorted({it.kind or "all" for it in items})
    for name, res in results.items():
        idx = non_square if name == "swapped-grid" else list(range(len(items)))
        r = report([items[i] for i in idx], res.subset(idx), ref.subset(idx))
        acc = r["bundle"]
        payload[name] = {"label": LABELS[name], "items": len(idx), "exact": acc["exact"],
                         "agreement_with_reference": r["agreement"],
                         f"exact_first_{SLICE}": res.subset(first).accuracy([items[i] for i in first])["exact"],
                         "by_kind": {k: acc["by_kind"].get(k, float("nan")) for k in kinds},
                         "seconds_per_item": acc["seconds_per_item"]}
        rows.append([LABELS[name] + (f" ({len(idx)} non-square items)" if name == "swapped-grid" else ""),
                     f"{acc['exact']:.1%}", f"{r['agreement']:.1%}",
                     " ".join(f"{payload[name]['by_kind'][k]:.0%}" for k in kinds), f"{acc['seconds_per_item']:.3f}"])
    header = ["system", "exact", "same answer as HF", "by kind (" + ", ".join(kinds) + ")", "s/item"]
    date = datetime.date.today().isoformat()
    md = (f"Accuracy of the trained tiny model on the synthetic held-out set ({len(items)} items, seed {HELDOUT_SEED}), "
          f"{date}, `python benchmarks/accuracy.py --work DIR --n {args.n}`, {args.threads} threads, "
          f"{machine().get('cpu', 'this machine')}, {time.perf_counter() - t_start:.0f} s in all.\n\n" + table(rows, header))
    print(md)
    save("accuracy" + (f"_{args.rows.replace(',', '_')}" if args.rows else ""), {"date": date, "machine": machine(), "n": len(items), "sizes": SIZES, "compile_seconds": compile_s,
                      "systems": payload}, md)
    return 0


def _not_square(path: Path) -> bool:
    from PIL import Image

    with Image.open(path) as img:
        return img.width != img.height


if __name__ == "__main__":
    sys.exit(main())
