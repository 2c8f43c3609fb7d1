"""Video through the vision tower: the ONNX bucket graph vs PyTorch eager, and time to first token.

    python benchmarks/video_bench.py --bundle /work/bench-scratch/4b-int4-v448 --threads 2
    python benchmarks/video_bench.py --bundle TINY_BUNDLE_WITH_A_256_BUCKET --size 256 --seconds 2 --rounds 1  # smoke

The bundle needs a ``SIZE`` x ``SIZE`` vision bucket and its PyTorch fallback weights (any
``qwen3vl-compile --buckets SIZE`` bundle). A clip of ``--seconds`` seconds at ``--clip-fps``
frames per second, ``SIZE`` x ``SIZE`` moving shapes, is written with PyAV (H.264) and read
as the runtime reads it (frames sampled at the bundle's video fps, 2 by default, only those
decoded).

1. **Vision seconds per second of video**: the sampled, preprocessed clip (``T`` temporal
   groups of one ``SIZE`` bucket grid each) through (a) the bundle's bucket graph in ONNX
   Runtime, one call per temporal group, as the runtime serves it (no feature cache), and
   (b) PyTorch eager: the unpatched Hugging Face tower (the bundle's fallback weights, fp32)
   on the whole video grid in one call. Rounds alternate (a, b, a, b, ...); medians. Both
   give the same features (checked: max relative error printed).
2. **Time to first token** of ``Pipeline.generate(videos=[clip])`` (a fresh pipeline, vision
   cache off): decode of the sampled frames, preprocessing, vision, embedding and prefill,
   with the stages' seconds.
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
from common import machine, save, scratch_dir, table  # noqa: E402


def write_clip(path: Path, seconds: float, fps: int, size: int) -> Path:
    """Moving coloured squares over a gradient, H.264 (yuv420p) in MP4."""
    import av

    n = int(round(seconds * fps))
    yy, xx = np.mgrid[0:size, 0:size]
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(n):
            img = np.stack([(xx + 3 * i) % 256, (yy * 2) % 256, np.full_like(xx, 90)], axis=-1).astype(np.uint8)
            for k in range(3):
                x0 = (i * (4 + 3 * k) + 60 * k) % (size - 64)
                img[40 + 120 * k:104 + 120 * k, x0:x0 + 64] = ((250, 40, 40), (40, 250, 40), (40, 40, 250))[k]
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", required=True, type=Path)
    ap.add_argument("--size", type=int, default=448, help="frame size and bucket (default 448)")
    ap.add_argument("--seconds", type=float, default=10.0, help="clip length (default 10)")
    ap.add_argument("--clip-fps", type=int, default=30, help="the clip's own frame rate (default 30)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds of each system (default 2)")
    ap.add_argument("--out-name", default=None)
    args = ap.parse_args(argv)

    import torch

    from qwen3vl_compile import Pipeline
    from qwen3vl_compile.runtime.video import Video, plan_video, preprocess_video

    torch.set_num_threads(args.threads)
    started = datetime.datetime.now().astimezone()
    scratch = scratch_dir("video_bench-")
    clip = write_clip(scratch / "clip.mp4", args.seconds, args.clip_fps, args.size)
    print(f"clip: {args.seconds:g} s at {args.clip_fps} fps, {args.size}x{args.size}, {clip.stat().st_size} bytes",
          flush=True)

    results: dict = {}
    with Pipeline.load(args.bundle, threads=args.threads, vision_cache_mb=0) as pipe:
        cfg = pipe.video_processor
        plan = plan_video(Video(clip), cfg)
        if pipe.vision.bucket_for_grid((1, *plan.grid_thw[1:])) is None:
            raise SystemExit(f"the sampled frames are {plan.resized[1]}x{plan.resized[0]} (grid {plan.grid_thw}); "
                             f"{args.bundle} has no bucket for them: compile it with --buckets {args.size}")
        t = time.perf_counter()
        pv = preprocess_video(clip, cfg)
        read_s = time.perf_counter() - t
        print(f"sampled {len(pv.indices)} frames at {cfg.fps:g} fps -> grid {pv.grid_thw}, {pv.num_tokens} tokens; "
              f"decode + preprocess {read_s:.2f} s", flush=True)
        fallback = pipe.vision._fallback_model()

        def onnx():
            return pipe.vision.encode_video(pv.pixel_values, pv.grid_thw)

        def eager():
            return fallback.run(pv.pixel_values, pv.grid_thw)

        ref_feats, _ = eager()
        got = onnx()
        rel = float(np.abs(got.image_features - ref_feats).max() / np.abs(ref_feats).max())
        times = {"onnx": [], "eager": []}
        for r in range(args.rounds):
            for name, fn in (("onnx", onnx), ("eager", eager)):
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
                print(f"round {r + 1}/{args.rounds} {name}: {times[name][-1]:.2f} s", flush=True)
        med = {k: statistics.median(v) for k, v in times.items()}
        results["vision"] = {"times": times, "median_s": med, "per_video_second": {k: v / args.seconds for k, v in med.items()},
                             "ratio_onnx_eager": med["onnx"] / med["eager"], "max_rel_err": rel,
                             "frames": len(pv.indices), "grid_thw": list(pv.grid_thw), "tokens": pv.num_tokens,
                             "decode_preprocess_s": read_s}
    # a fresh pipeline: first-call costs included, as a user's first request sees them
    with Pipeline.load(args.bundle, threads=args.threads, vision_cache_mb=0) as pipe:
        t = time.perf_counter()
        r = pipe.generate(videos=[clip], prompt="What happens in this video?", max_new_tokens=4)
        wall = time.perf_counter() - t
        results["ttft"] = {"time_to_first_token_s": r.timings["time_to_first_token_s"], "prompt_tokens": r.prompt_tokens,
                           "timings": r.timings, "video": r.videos[0], "wall_s": wall}
        print(f"time to first token {r.timings['time_to_first_token_s']:.1f} s ({r.prompt_tokens} prompt tokens): "
              f"{r.timings}", flush=True)

    v, tt = results["vision"], results["ttft"]["timings"]
    rows = [["ONNX Runtime, bucket graph per temporal group", f"{v['median_s']['onnx']:.2f} s",
             f"{v['per_video_second']['onnx']:.2f}", f"{v['ratio_onnx_eager']:.2f}x"],
            ["PyTorch eager (Hugging Face tower, fp32)", f"{v['median_s']['eager']:.2f} s",
             f"{v['per_video_second']['eager']:.2f}", "1.00x"]]
    m = machine()
    md = (f"video_bench {started:%Y-%m-%d %H:%M %Z}, {args.bundle.name}, {args.threads} threads, "
          f"{args.seconds:g} s clip at {args.clip_fps} fps, {args.size}x{args.size}; {m.get('cpu', '')}\n\n"
          f"Sampled at {v['frames'] / args.seconds:g} fps: {v['frames']} frames, grid {v['grid_thw']}, {v['tokens']} video "
          f"tokens; reading and preprocessing them {v['decode_preprocess_s']:.2f} s. Vision, medians of {args.rounds} "
          f"alternating rounds (features agree to {v['max_rel_err']:.1e} relative):\n\n"
          + table(rows, ["vision tower", "whole clip", "s per s of video", "vs eager"])
          + f"\n\nTime to first token, fresh pipeline: {tt['time_to_first_token_s']:.1f} s for "
            f"{results['ttft']['prompt_tokens']} prompt tokens (preprocess incl. decode {tt.get('preprocess_s', 0):.1f} s, "
            f"vision {tt.get('vision_s', 0):.1f} s, embedding {tt.get('embed_s', 0):.2f} s, "
            f"prefill {tt.get('prefill_s', 0):.1f} s).")
    save(args.out_name or f"video_bench_{started:%Y-%m-%d}", {"date": started.isoformat(), "bundle": str(args.bundle),
                                                             "threads": args.threads, "machine": m, "results": results}, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
