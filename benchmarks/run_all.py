"""Every performance figure of the README in one run on this machine, then the table.

    python benchmarks/run_all.py --work /work/bench [--threads 2] [--torch]

Steps, in sequence (never two at once: each would steal the other's cores):

1. compile the ``qwen3-vl-4b`` preset (real config, random weights): buckets 448 and 896, the
   any-size graph, INT4 decoder, ``--target ort-genai``, every parity check, under
   /usr/bin/time (wall and peak RSS of the whole process) -> ``results/compile_4b.json``
2. ``vision_bench.py`` on that bundle's 448 and 896 buckets (PyTorch eager, plain export, ours,
   and ours compiled with ``--vision-precision int8`` in a vision-only bundle)
3. ``decoder_bench.py``: our INT4 decoder vs onnxruntime-genai's builder INT4 decoder (built
   here, timed), and our decoder built with ``--block-size 128`` (the block-size lever)
   [and PyTorch eager with ``--torch``: ~17 GB]
4. ``e2e_bench.py``: one 448 image + 20 words, 64 tokens, ours vs onnxruntime-genai's pipeline
   on the same bundle
5. ``llamacpp_bench.py`` (with ``--llama-cpp DIR``, and ``--sdist FILE`` to unpack llama.cpp's
   sources from the ``llama-cpp-python`` sdist): llama.cpp Q4_0 / Q4_K_M and its f16 mmproj beside
   our decoders (block 32 and 128) and the 448 vision bucket in fp32 and in int8
6. ``perf_table.py``: the table the README quotes

An existing bundle or builder output under ``--work`` is reused (``--fresh`` rebuilds);
``--steps vision,decoder`` reruns only those steps (the table is always printed). Each step is
one command that fits in well under 40 minutes on 2 cores, so a run can be done in pieces.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, machine, run_timed, save  # noqa: E402

HERE = Path(__file__).resolve().parent


def step(title: str, cmd: list[str]) -> None:
    print(f"\n== {title}\n$ {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, required=True, help="where the 4B bundle and the builder's output go")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--torch", action="store_true", help="also time PyTorch eager fp32 in the decoder benchmark")
    ap.add_argument("--fresh", action="store_true", help="rebuild the bundle and the builder's decoder")
    ap.add_argument("--steps", default="vision,decoder,e2e,llamacpp", help="which benchmark steps to run (default: all)")
    ap.add_argument("--llama-cpp", type=Path, default=None, help="llama.cpp source tree for the llamacpp step")
    ap.add_argument("--sdist", type=Path, default=None, help="llama-cpp-python sdist to unpack llama.cpp from")
    args = ap.parse_args()
    steps = set(args.steps.split(","))
    py = sys.executable
    bundle, genai, b128 = args.work / "4b-int4", args.work / "genai-int4", args.work / "4b-int4-block128"
    v8 = args.work / "4b-vision-int8"
    if args.fresh:
        for d in (bundle, genai, b128, v8):
            shutil.rmtree(d, ignore_errors=True)
    args.work.mkdir(parents=True, exist_ok=True)

    if not (bundle / "manifest.json").is_file():
        cmd = [py, "-m", "qwen3vl_compile.cli", "--model", "qwen3-vl-4b", "--buckets", "448,896,dynamic",
               "--target", "ort-genai", "--threads", str(args.threads), "-o", str(bundle), "-q"]
        print(f"== compile\n$ {' '.join(cmd)}", flush=True)
        wall, rss, _ = run_timed(cmd)
        m = json.loads((bundle / "manifest.json").read_text())
        date = datetime.date.today().isoformat()
        text = (f"compile of {bundle.name} ({', '.join(m['options']['buckets'])}, {m['options']['precision']} decoder, "
                f"target {m['options']['target']}, all parity checks): wall {wall / 60:.1f} min, peak RSS {rss / 2**30:.1f} GiB "
                f"(/usr/bin/time); {date}, {machine()['cpu']}")
        print(text)
        save("compile_4b", {"date": date, "machine": machine(), "wall_s": wall, "peak_rss_bytes": rss,
                            "command": cmd[2:], "stage_seconds": m["timings"]}, text)
    if steps & {"vision", "llamacpp"} and not (v8 / "manifest.json").is_file():
        step("vision in int8", [py, "-m", "qwen3vl_compile.cli", "--model", "qwen3-vl-4b", "--graphs", "vision",
                                "--buckets", "448,896", "--vision-precision", "int8", "--threads", str(args.threads),
                                "-o", str(v8), "-q"])
    if "vision" in steps:
        for b in ("448", "896"):
            step(f"vision {b}", [py, str(HERE / "vision_bench.py"), "--bundle", str(bundle), "--bucket", b,
                                 "--int8", str(v8), "--threads", str(args.threads)])
    if steps & {"decoder", "llamacpp"} and not (b128 / "manifest.json").is_file():
        step("decoder with --block-size 128", [py, "-m", "qwen3vl_compile.cli", "--model", "qwen3-vl-4b", "--graphs", "decoder",
                                               "--block-size", "128", "--threads", str(args.threads), "-o", str(b128), "-q"])
    if "decoder" in steps:
        dec = [py, str(HERE / "decoder_bench.py"), "--bundle", str(bundle), "--genai", str(genai), "--threads", str(args.threads),
               "--extra", f"qwen3vl-compile INT4 --block-size 128={b128 / 'decoder.onnx'}"]
        if not (genai / "model.onnx").is_file():
            dec.append("--build-genai")
        if args.torch:
            dec.append("--torch")
        step("decoder", dec)
    if "e2e" in steps:
        step("end to end", [py, str(HERE / "e2e_bench.py"), "--bundle", str(bundle), "--threads", str(args.threads)])
    if "llamacpp" in steps:
        cmd = [py, str(HERE / "llamacpp_bench.py"), "--bundle", str(bundle), "--bundle", str(b128), "--vision-int8", str(v8),
               "--threads", str(args.threads)]
        if args.llama_cpp:
            cmd += ["--llama-cpp", str(args.llama_cpp), "--work", str(args.work / "gguf")]
        if args.sdist:
            cmd += ["--sdist", str(args.sdist)]
        step("llama.cpp side by side", cmd)
    step("table", [py, str(HERE / "perf_table.py"), "--bundle", str(bundle)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
