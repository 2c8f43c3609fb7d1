"""``qwen3vl-compile``: compile a Qwen3-VL checkpoint into a verified ONNX bundle.

    qwen3vl-compile --model tiny --buckets 224,448 -o OUT
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .buckets import DYNAMIC, parse_buckets
from .config import GRAPH_KINDS, TARGETS, VISION_PRECISIONS, CompileConfig
from .options import DEFAULT_CONTEXT_LENGTH, EMBEDDING_PRECISIONS, LOGITS_MODES, MAX_THREADS, PRECISIONS, DecoderOptions
from .cli_io import OneLineParser, run_cli
from .errors import UsageError
from .parity import parity_summary


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="qwen3vl-compile",
        description="Compile a Hugging Face Qwen3-VL checkpoint into a verified, bucketed ONNX bundle.",
    )
    p.add_argument("--model", default="tiny", help="checkpoint directory, or a preset: tiny (default), tiny-moe, qwen3-vl-2b|4b|8b|32b|30b-a3b|235b-a22b "
                        "(random weights), NAME:N for its first N text layers")
    p.add_argument("--buckets", default="224,448", help="vision image sizes, e.g. 224,448,448x672 (HEIGHTxWIDTH)")
    p.add_argument("-o", "--output", required=True, type=Path, help="bundle directory to create")
    d = DecoderOptions()  # the one set of defaults
    p.add_argument("--precision", default=d.precision, choices=PRECISIONS, help=f"text decoder precision (default {d.precision})")
    p.add_argument("--block-size", type=int, default=d.block_size, help=f"INT4 quantization block size (default {d.block_size})")
    p.add_argument("--accuracy-level", type=int, default=d.accuracy_level,
                   help=f"MatMulNBits accuracy_level (default {d.accuracy_level}: int8 compute)")
    p.add_argument("--keep-lm-head-fp", action="store_true", help="do not quantize lm_head in int4 mode")
    p.add_argument("--context-length", type=int, default=None,
                   help=f"KV cache / rotary table length (default {DEFAULT_CONTEXT_LENGTH}, or the model's "
                        "max_position_embeddings if smaller)")
    p.add_argument("--logits", default=d.logits, choices=LOGITS_MODES,
                   help=f"decoder logits for the last position only or all (default {d.logits})")
    p.add_argument("--embedding-precision", default=d.embedding_precision, choices=EMBEDDING_PRECISIONS,
                   help="token embedding table: the checkpoint's dtype (auto: bf16 stays bf16, exact), fp32, or "
                        "int4 (reuses the INT4 lm_head's bytes: no extra size, quantized embeddings)")
    p.add_argument("--vision-precision", default="fp32", choices=VISION_PRECISIONS,
                   help="vision graphs: fp32 (default), or int8 weights and activations in every linear layer "
                        "(faster on CPUs with int8 dot products; gated against the fp32 reference at a looser "
                        "tolerance; the patch embedding, attention and the PyTorch fallback stay fp32)")
    p.add_argument("--graphs", default=",".join(GRAPH_KINDS), help="which graphs to build (default: all)")
    p.add_argument("--target", default="onnx", choices=TARGETS,
                   help="onnx (default): the bundle for qwen3vl-run; ort-genai: also genai_config.json, "
                        "processor_config.json and genai_*.onnx graphs that onnxruntime-genai loads, DeepStack "
                        "included (adds the 'dynamic' vision graph when --buckets lacks it)")
    p.add_argument("--no-verify", action="store_true", help="skip the parity gate (figures are then not measured)")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.add_argument("--sign-key", type=Path, default=None,
                   help="sign the bundle (model.sig) with this PEM elliptic-curve private key; needs the sign extra")
    p.add_argument("--threads", type=int, default=0, help=f"threads for PyTorch and ONNX Runtime (0: library default; at most {MAX_THREADS})")
    p.add_argument("--cache-dir", type=Path, default=None, help="where presets are materialised")
    g = p.add_mutually_exclusive_group()
    g.add_argument("-v", "--verbose", action="store_true", default=None, help="show progress even when not on a terminal")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    return p


def main(argv: list[str] | None = None) -> int:
    exiting = argv is None  # the console script: the process ends when this returns
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("inspect", "verify", "sign"):
        from . import bundle_cli

        return bundle_cli.main(argv, exiting=exiting)
    writers = []  # the compile's bundle writer, once made: it knows what is at the output now

    def interrupted() -> str:
        return writers[-1].interrupted_message() if writers else "interrupted; nothing was written"

    return run_cli(lambda: _compile(argv, writers.append), "qwen3vl-compile", interrupted=interrupted,
                   exiting=exiting)


def _compile(argv: list[str], on_writer=None) -> int:
    args = _parser().parse_args(argv)
    if args.quiet:  # upstream deprecation notices are not the user's business in quiet mode
        import warnings

        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
    buckets = args.buckets
    if args.target == "ort-genai" and DYNAMIC not in [b.strip().lower() for b in buckets.split(",")]:
        # onnxruntime-genai sends every image size to one vision graph.
        buckets = f"{buckets},{DYNAMIC}"
    try:
        parsed = parse_buckets(buckets)
    except UsageError:
        # The same refusal again, its suggested sizes within this checkpoint's max_pixels.
        max_pixels = _max_pixels(args.model, args.cache_dir)
        if max_pixels:
            parse_buckets(buckets, max_pixels=max_pixels)
        raise
    cfg = CompileConfig(
        model=args.model,
        output=args.output,
        buckets=parsed,
        decoder=DecoderOptions(
            precision=args.precision,
            block_size=args.block_size,
            accuracy_level=args.accuracy_level,
            keep_lm_head_fp=args.keep_lm_head_fp,
            context_length=args.context_length,
            logits=args.logits,
            embedding_precision=args.embedding_precision,
        ),
        graphs=tuple(g.strip() for g in args.graphs.split(",") if g.strip()),
        target=args.target,
        vision_precision=args.vision_precision,
        verify=not args.no_verify,
        force=args.force,
        threads=args.threads,
        cache_dir=args.cache_dir,
        verbose=False if args.quiet else args.verbose,
        command=tuple(["qwen3vl-compile", *argv]),
        sign_key=args.sign_key,
    )
    from .compiler import compile_bundle

    manifest = compile_bundle(cfg, on_writer=on_writer)
    _print_summary(cfg, manifest)
    return 0


def _max_pixels(model: str, cache_dir) -> int | None:
    """The checkpoint's max_pixels (preprocessor_config.json), or None when it cannot be read
    (the load stage reports that properly)."""
    from .jsonio import read_json_object
    from .errors import Qwen3VLCompileError
    from .model.checkpoint import resolve_model_source
    from .processor_config import ProcessorConfig

    try:
        path = resolve_model_source(model, cache_dir=cache_dir)
        return ProcessorConfig.from_dict(read_json_object(path / "preprocessor_config.json", UsageError)).max_pixels
    except (Qwen3VLCompileError, OSError, ValueError, TypeError):
        return None


def _print_summary(cfg: CompileConfig, manifest: dict) -> None:
    print(f"wrote {cfg.output}" + (" (signed: model.sig)" if cfg.sign_key is not None else ""))
    for name, g in manifest["graphs"].items():
        parity = manifest["parity"].get(name)
        verdict = parity_summary(parity) if parity else "parity not verified"
        print(f"  {g['file']:<28} {g['kind']:<9} {g['precision']:<5} {verdict}")


if __name__ == "__main__":
    sys.exit(main())
