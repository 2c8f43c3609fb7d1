"""End to end on a compiled bundle: one image + a 20-word prompt, 64 greedy tokens.

    python benchmarks/e2e_bench.py --bundle /work/bench/4b-int4 --threads 2

Reports, from the Pipeline's own per-stage timings (median of ``--runs`` after a warm-up):
vision time (bucket graph), time to first token, decode tokens/s, total; the PyTorch
fallback's vision time for the same image; and the process's peak RSS. If the bundle was
compiled with ``--target ort-genai`` and onnxruntime-genai is installed, the same request
through onnxruntime-genai's own pipeline (its processor, the bundle's ``genai_*.onnx`` graphs,
its search loop) is timed round-robin beside it, from the image file to the last token.
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

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, save, scratch_dir, table  # noqa: E402

PROMPT = ("Describe this image in detail: what objects are there, what colours do they have, "
          "and where are they placed relative to each other?")  # 20 words


def genai_runner(bundle: Path, threads: int):
    """onnxruntime-genai's own pipeline (processor, vision, embedding, decoder, search) on the
    bundle's genai_config.json; None when the bundle or the package is missing."""
    if not (bundle / "genai_config.json").is_file():
        return None
    try:
        import onnxruntime_genai as og
    except ImportError:
        return None
    config = og.Config(str(bundle))
    opts = {"session_options": {"intra_op_num_threads": threads, "inter_op_num_threads": 1}}
    config.overlay(json.dumps({"model": {k: opts for k in ("decoder", "embedding", "vision")}}))
    model = og.Model(config)
    processor = model.create_multimodal_processor()

    def run(text: str, image_path: str, max_new_tokens: int) -> dict:
        t0 = time.perf_counter()
        inputs = processor(text, images=og.Images.open(image_path))
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=8192)
        gen = og.Generator(model, params)
        gen.set_inputs(inputs)
        gen.generate_next_token()
        ttft = time.perf_counter() - t0
        ids = [int(gen.get_next_tokens()[0])]
        t1 = time.perf_counter()
        while len(ids) < max_new_tokens and not gen.is_done():
            gen.generate_next_token()
            ids.append(int(gen.get_next_tokens()[0]))
        decode_s = time.perf_counter() - t1
        return {"time_to_first_token_s": ttft, "decode_tokens_per_s": (len(ids) - 1) / decode_s if len(ids) > 1 else 0.0,
                "total_s": time.perf_counter() - t0, "token_ids": ids}

    return run


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
    from qwen3vl_compile.runtime.chat import build_messages
    from qwen3vl_compile.runtime.preprocess import preprocess

    image = Image.open(Path(__file__).resolve().parent.parent / "qwen3vl_compile" / "assets" / "sample.png").convert("RGB")
    image = image.resize((args.size, args.size), Image.Resampling.BICUBIC)
    image_path = scratch_dir("e2e-bench-") / f"sample_{args.size}.png"
    image.save(image_path)
    t = time.perf_counter()
    # Every run does the whole work, as a first request does: no vision cache, no KV prefix reuse
    # (with them, runs after the first answer from the caches in a fraction of the time).
    pipe = Pipeline.load(args.bundle, threads=args.threads, vision_cache_mb=0, reuse_prefix=False)
    load_s = time.perf_counter() - t
    genai = genai_runner(args.bundle, args.threads)
    text = pipe.chat.render(build_messages(PROMPT, 1))  # genai's processor expands the image pad itself
    results, genai_results = [], []
    for _ in range(args.runs + 1):  # round-robin; the first round is a warm-up
        results.append(pipe.generate(images=[image_path], prompt=PROMPT, max_new_tokens=args.tokens))
        if genai:
            genai_results.append(genai(text, str(image_path), args.tokens))
    runs, genai_runs = results[1:], genai_results[1:]

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
    notes = []
    if genai_runs:
        def gmed(key):
            return statistics.median(r[key] for r in genai_runs)

        rows.append(["onnxruntime-genai pipeline, same bundle (genai_*.onnx)", "", "", f"{gmed('time_to_first_token_s'):.2f}",
                     f"{gmed('decode_tokens_per_s'):.2f}", f"{gmed('total_s'):.2f}"])
        ours_ids, theirs = runs[0].token_ids, genai_runs[0]["token_ids"]
        same = next((i for i, (a, b) in enumerate(zip(ours_ids, theirs)) if a != b), min(len(ours_ids), len(theirs)))
        notes.append(f"ours vs onnxruntime-genai: time to first token {gmed('time_to_first_token_s') / med('time_to_first_token_s'):.2f}x "
                     f"faster, decode {med('decode_tokens_per_s') / gmed('decode_tokens_per_s'):.2f}x, total "
                     f"{gmed('total_s') / med('total_s'):.2f}x faster; greedy tokens agree on the first {same} of "
                     f"{len(ours_ids)} / {len(theirs)}")
    else:
        notes.append("onnxruntime-genai pipeline not run: the bundle has no genai_config.json (compile with --target "
                     "ort-genai) or onnxruntime-genai is not installed")
    date = datetime.date.today().isoformat()
    m = machine()
    text = "\n".join([
        f"End to end, {args.bundle.name}: one {args.size}x{args.size} image ({runs[0].images[0]['tokens']} image tokens), "
        f"{runs[0].prompt_tokens}-token prompt, {args.tokens} greedy tokens, {args.threads} threads, median of {args.runs}; "
        f"{date}, {m['cpu']}, {m['cores']} cores",
        "",
        table(rows, ["system", "vision (s)", "prefill (s)", "time to first token (s)", "decode tok/s", "total (s)"]),
        "",
        *notes,
        f"bundle load {load_s:.1f} s; peak RSS of this process (bundle sessions + fallback tower"
        f"{' + onnxruntime-genai model' if genai else ''}) {rss / 2**30:.2f} GiB",
    ])
    print(text)
    save(args.name, {"date": date, "machine": m, "runs": [r.to_json() for r in runs], "fallback_vision_s": fb_times,
                     "genai_runs": genai_runs, "load_s": load_s, "peak_rss_bytes": rss}, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
