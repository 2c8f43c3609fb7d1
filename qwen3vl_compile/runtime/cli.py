"""``qwen3vl-run OUT --image a.jpg --prompt "Describe this image"``: stream the answer.
``--video clip.mp4`` (repeatable, after the images in the prompt) needs the ``[video]`` extra.

User mistakes (missing image or video, unreadable video, bad bundle, prompt too long, ...) give one line on stderr and
a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys



def _parser() -> argparse.ArgumentParser:
    from ..cli_io import OneLineParser, add_video_options

    p = OneLineParser(prog="qwen3vl-run", description="Answer a prompt about image(s) and video(s) with a compiled bundle.")
    p.add_argument("bundle", help="bundle directory written by qwen3vl-compile")
    p.add_argument("--image", action="append", default=[], help="image file (repeat for several images)")
    p.add_argument("--video", action="append", default=[],
                   help="video file (repeat for several; after the images in the prompt; needs the [video] extra)")
    add_video_options(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--on-miss", default="fallback", choices=("fallback", "fit", "error"),
                   help="image size with no bucket: PyTorch fallback (default), fit to the nearest bucket, or error")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: all cores)")
    p.add_argument("--json", action="store_true", help="print one JSON object at the end instead of streaming text")
    p.add_argument("--skip-hash-check", action="store_true", help="run even if files differ from the manifest's hashes")
    p.add_argument("--public-key", default=None, help="PEM public key: refuse a bundle not signed by its private key")
    return p


def main(argv=None) -> int:
    from ..cli_io import run_cli

    return run_cli(lambda: _run(argv), "qwen3vl-run", exiting=argv is None)


def _run(argv) -> int:
    args = _parser().parse_args(argv)
    from ..cli_io import video_options
    from .pipeline import Pipeline

    with Pipeline.load(args.bundle, threads=args.threads, on_miss=args.on_miss, skip_hash_check=args.skip_hash_check,
                       public_key=args.public_key, **video_options(args)) as pipe:
        pieces = pipe.generate(
            images=args.image, videos=args.video, prompt=args.prompt, system=args.system, max_new_tokens=args.max_new_tokens,
            temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed, stream=True,
        )
        for piece in pieces:
            if not args.json:
                sys.stdout.write(piece)
                sys.stdout.flush()
    result = pieces.result
    if args.json:
        print(json.dumps(result.to_json(), ensure_ascii=False))
    else:
        sys.stdout.write("\n")
        for img in result.images:
            extra = f"; {img['fit']}" if "fit" in img else ""
            print(f"[image {img['index']}: grid {img['grid_thw'][1]}x{img['grid_thw'][2]}, {img['served_by']}{extra}]", file=sys.stderr)
        for vid in result.videos:
            extra = f"; {vid['fit']}" if "fit" in vid else ""
            t, h, w = vid["grid_thw"]
            print(f"[video {vid['index']}: {vid['frames']} frames, grid {t}x{h}x{w}, {vid['tokens']} tokens, "
                  f"{vid['served_by']}{extra}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
