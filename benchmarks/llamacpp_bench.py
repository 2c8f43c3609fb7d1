"""llama.cpp beside qwen3vl-compile on this CPU: the same random ``qwen3-vl-4b`` weights, the same
threads, one run with the systems alternating.

    python benchmarks/llamacpp_bench.py --bundle B32 --bundle B128 --vision-int8 V8 \\
        --llama-cpp /work/llama/src --sdist llama_cpp_python-0.3.36.tar.gz --threads 2 --rounds 3

``--bundle``: our INT4 bundles (each labelled by its ``--block-size``; the first one must hold the
448 vision bucket, fp32, and the embedding graph, which a decoder-only bundle borrows), ``--vision-int8``: a bundle compiled with ``--graphs vision --buckets 448
--vision-precision int8``. llama.cpp is built the way a user can on a machine without internet
beyond the package index: its sources ship in the ``llama-cpp-python`` sdist
(``pip download llama-cpp-python==0.3.36 --no-binary :all: --no-deps``), and ``--sdist`` unpacks
its ``vendor/llama.cpp`` into ``--llama-cpp`` when that directory is empty. Without either, the
benchmark is skipped with a reason (exit 0): llama.cpp is optional.

Steps, each skipped when its output is already there (so a run interrupted after the build or
the conversion resumes): build (cmake, native CPU flags, no curl; ``llama-bench``,
``llama-quantize``, ``llama-mtmd-cli``); conversion of the bundle's source checkpoint with
llama.cpp's own ``convert_hf_to_gguf.py`` (text model and ``--mmproj``, f16). The preset's
tokenizer is not the official one, so the converter does not know its pre-tokenizer hash: the
converter runs with ``get_vocab_base_pre`` answering ``qwen2`` (Qwen3-VL's pre-tokenizer); then
``llama-quantize`` to each of ``--quants``, and the f16 text file is removed.

Timed, per round, every system once: prefill of 300 tokens, decode of 128 tokens from an empty
cache and at depth 300 (``llama-bench -p 300`` / ``-n 128`` / ``-n 128 -d 300``; ours through
``decoder_bench.OnnxDecoder``), and the 448x448 image encode (``llama-mtmd-cli -c 4096``, the
encoder's own timer, 196 image tokens; ours: the bucket graph's ``run``). llama.cpp runs with
its defaults (repacked weight layout) where they run; at some commits its repacked kernels
crash on batched prompts on AVX-512 CPUs, and a test that crashes is run with ``-ub 1`` (prompt
fed token by token, repacked decode kernels kept), then ``--repack 0``; each figure names its
setting (``--all-settings`` times every setting). The table compares ours against the fastest
setting that ran.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, save, table  # noqa: E402
from decoder_bench import NEW, PROMPT, OnnxDecoder, memory_bandwidth  # noqa: E402

TARGETS = ("llama-bench", "llama-quantize", "llama-mtmd-cli")
TESTS = {  # name -> llama-bench arguments
    f"prefill {PROMPT}": ["-p", str(PROMPT), "-n", "0"],
    f"decode {NEW} @0": ["-p", "0", "-n", str(NEW)],
    f"decode {NEW} @{PROMPT}": ["-p", "0", "-n", str(NEW), "-d", str(PROMPT)],
}
SETTINGS = {"repack (default)": [], "repack, -ub 1": ["-ub", "1"], "--repack 0": ["--repack", "0"]}
IMAGE_PROMPT = "Describe this image."
CONVERT = r"""
import os, runpy, sys
src, args = sys.argv[1], sys.argv[2:]
sys.path[0:0] = [src, src + "/gguf-py"]
from conversion import base
# The preset tokenizer is a stand-in for the official one: map its unknown hash to Qwen3-VL's pre-tokenizer.
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"
if not os.path.isfile(os.path.join(args[0], "tokenizer.model")):
    # Qwen's converter tries a SentencePiece model first and takes the BPE vocab when the file is
    # missing; answer that without importing sentencepiece (not installed here, not needed).
    def no_sentencepiece(self):
        raise FileNotFoundError("no tokenizer.model")
    base.TextModel._create_vocab_sentencepiece = no_sentencepiece
sys.argv = [src + "/convert_hf_to_gguf.py", *args]
runpy.run_path(src + "/convert_hf_to_gguf.py", run_name="__main__")
"""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sh(cmd: list, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if proc.returncode:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"llamacpp_bench: command failed ({proc.returncode}): {' '.join(map(str, cmd))}")
    return proc


def locate_sources(src: Path | None, sdist: Path | None) -> Path | None:
    """The llama.cpp source tree, unpacked from the sdist when needed; None when there is none."""
    if src is None:
        return None
    if (src / "CMakeLists.txt").is_file():
        return src
    if sdist is None or not sdist.is_file():
        return None
    log(f"unpacking llama.cpp from {sdist.name}")
    tmp = src.with_name(src.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(sdist) as tf:
        members = [m for m in tf.getmembers() if "/vendor/llama.cpp/" in m.name + "/"]
        tf.extractall(tmp, members=members, filter="data")
    (inner,) = tmp.glob("*/vendor/llama.cpp")
    src.mkdir(parents=True, exist_ok=True)
    for p in inner.iterdir():
        p.rename(src / p.name)
    shutil.rmtree(tmp)
    return src


def build(src: Path) -> Path:
    bin_dir = src / "build" / "bin"
    if all((bin_dir / t).is_file() for t in TARGETS):
        return bin_dir
    log("building llama.cpp (cmake, native CPU flags; ~8 min on 2 cores)")
    sh(["cmake", "-S", src, "-B", src / "build", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
        "-DCMAKE_BUILD_TYPE=Release"])
    sh(["cmake", "--build", src / "build", "-j", str(os.cpu_count() or 2), "--target", *TARGETS])
    return bin_dir


def convert(src: Path, bin_dir: Path, checkpoint: Path, work: Path, quants: list[str]) -> dict[str, Path]:
    """GGUF files: each quant of the text model, and the f16 mmproj."""
    work.mkdir(parents=True, exist_ok=True)
    out = {q: work / f"text-{q}.gguf" for q in quants}
    out["mmproj"] = work / "mmproj-f16.gguf"
    f16 = work / "text-f16.gguf"
    if not out["mmproj"].is_file():
        log("converting the vision tower (mmproj, f16)")
        tmp = out["mmproj"].with_suffix(".partial")
        sh([sys.executable, "-c", CONVERT, src, checkpoint, "--mmproj", "--outtype", "f16", "--outfile", tmp])
        tmp.rename(out["mmproj"])
    missing = [q for q in quants if not out[q].is_file()]
    if missing and not f16.is_file():
        log("converting the text model (f16)")
        tmp = f16.with_suffix(".partial")
        sh([sys.executable, "-c", CONVERT, src, checkpoint, "--outtype", "f16", "--outfile", tmp])
        tmp.rename(f16)
    for q in missing:
        log(f"quantizing to {q}")
        tmp = out[q].with_suffix(".partial")
        sh([bin_dir / "llama-quantize", f16, tmp, q])
        tmp.rename(out[q])
    if f16.is_file():
        f16.unlink()  # 8 GB, and every quant is made
    return out


def gguf_read_bytes(src: Path, path: Path) -> int:
    """Weight bytes a decode step reads: every tensor but the token-embedding table (one row is
    gathered), unless the table is also the output head (tied)."""
    sys.path.insert(0, str(src / "gguf-py"))
    from gguf import GGUFReader

    sizes = {t.name: int(t.n_bytes) for t in GGUFReader(path).tensors}
    if "output.weight" in sizes:
        sizes.pop("token_embd.weight", None)
    return sum(sizes.values())


def llama_bench(bin_dir: Path, model: Path, test: list[str], setting: list[str], threads: int) -> float | None:
    """Tokens/s of one repetition, or None when llama-bench crashed."""
    proc = subprocess.run([str(bin_dir / "llama-bench"), "-m", str(model), "-t", str(threads), "-r", "1", "-o", "json",
                           *test, *setting], capture_output=True, text=True)
    if proc.returncode:
        return None
    rows = json.loads(proc.stdout)
    return float(rows[0]["avg_ts"])


def llama_bench_info(bin_dir: Path, model: Path, threads: int) -> dict:
    proc = sh([bin_dir / "llama-bench", "-m", model, "-t", threads, "-r", "1", "-o", "json", "-p", "0", "-n", "1"])
    row = json.loads(proc.stdout)[0]
    return {k: row.get(k) for k in ("build_commit", "build_number", "cpu_info", "model_type", "model_size", "model_n_params")}


def mtmd_encode(bin_dir: Path, model: Path, mmproj: Path, image: Path, threads: int) -> tuple[float, int]:
    """Seconds llama-mtmd-cli spends in its vision encoder for one image, and the image tokens it
    made (its verbose log; the encoder's own timer, not the prompt decode that follows)."""
    proc = sh([bin_dir / "llama-mtmd-cli", "-m", model, "--mmproj", mmproj, "--image", image, "-p", IMAGE_PROMPT,
               "-n", "1", "-c", "4096", "-t", threads, "--temp", "0", "-v"])
    log = proc.stdout + proc.stderr
    ms = [int(m) for m in re.findall(r"(?:slice encoded in|mtmd batch encoding done in) (\d+) ms", log)]
    tokens = [int(t) for t in re.findall(r"encoding batch with \d+ entries and total (\d+) tokens", log)]
    if not ms:
        raise SystemExit("llamacpp_bench: llama-mtmd-cli printed no encoding time")
    return sum(ms) / 1000, sum(tokens)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, action="append", required=True, help="our INT4 bundle (repeatable)")
    ap.add_argument("--vision-int8", type=Path, default=None, help="a bundle with the int8 448 vision bucket")
    ap.add_argument("--llama-cpp", type=Path, default=None, help="llama.cpp source tree (unpacked here from --sdist)")
    ap.add_argument("--sdist", type=Path, default=None, help="llama-cpp-python sdist that carries llama.cpp's sources")
    ap.add_argument("--work", type=Path, default=None, help="where the GGUF files go (default: LLAMA_CPP/qwen3vl-gguf)")
    ap.add_argument("--quants", default="Q4_0,Q4_K_M")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--name", default="llamacpp_4b")
    ap.add_argument("--all-settings", action="store_true",
                    help="time every llama.cpp setting, not only the first that runs (about 2.5x longer)")
    args = ap.parse_args()

    src = locate_sources(args.llama_cpp, args.sdist)
    if src is None:
        print("llamacpp_bench: skipped: no llama.cpp sources (give --llama-cpp DIR, and --sdist FILE to unpack them "
              "from `pip download llama-cpp-python==0.3.36 --no-binary :all: --no-deps`)")
        return 0
    manifests = [json.loads((b / "manifest.json").read_text()) for b in args.bundle]
    checkpoint = Path(manifests[0]["source"]["path"])
    if not (checkpoint / "config.json").is_file():
        raise SystemExit(f"llamacpp_bench: the bundle's source checkpoint {checkpoint} is not there")
    bin_dir = build(src)
    quants = [q for q in args.quants.split(",") if q]
    work = args.work or src / "qwen3vl-gguf"
    gguf = convert(src, bin_dir, checkpoint, work, quants)
    info = llama_bench_info(bin_dir, gguf[quants[0]], args.threads)
    log(f"llama.cpp {info['build_commit']} ({info['build_number']}), {info['cpu_info']}")

    import onnxruntime as ort
    from PIL import Image

    from qwen3vl_compile.buckets import parse_bucket
    from qwen3vl_compile.export.vision import random_pixel_values
    from qwen3vl_compile.runtime.session import ort_session

    # Our systems.
    ids = np.random.default_rng(0).integers(0, 150000, PROMPT).tolist()
    decoders = {}
    for b, m in zip(args.bundle, manifests):
        block = m["graphs"]["decoder"]["quantization"]["block_size"]
        embed = ort_session((b if (b / "embedding.onnx").is_file() else args.bundle[0]) / "embedding.onnx", args.threads)
        decoders[f"qwen3vl-compile INT4 block {block}"] = (
            OnnxDecoder(b / "decoder.onnx", embed, args.threads, m["graphs"]["decoder"]["spec"]["head_dim"], ids), m)
    bucket = parse_bucket("448")
    pixels = random_pixel_values(bucket, seed=11)
    vision = {"qwen3vl-compile vision fp32": ort_session(args.bundle[0] / "vision_448.onnx", args.threads)}
    if args.vision_int8:
        vision["qwen3vl-compile vision int8"] = ort_session(args.vision_int8 / "vision_448.onnx", args.threads)
    image = work / "image-448.png"
    Image.open(Path(__file__).resolve().parent.parent / "qwen3vl_compile" / "assets" / "sample.png").convert("RGB").resize(
        (448, 448), Image.Resampling.BICUBIC).save(image)

    llama: dict[tuple[str, str, str], list[float]] = {}  # (quant, test, setting) -> tok/s per round
    crashed: set[tuple[str, str, str]] = set()
    ours: dict[str, dict[str, list[float]]] = {k: {} for k in [*decoders, *vision]}
    mtmd: list[float] = []
    for s in vision.values():  # first-call costs out of the timings
        s.run(None, {"pixel_values": pixels})
    for r in range(args.rounds):
        log(f"round {r + 1}/{args.rounds}")
        for q in quants:
            for test, targs in TESTS.items():
                for setting, sargs in SETTINGS.items():
                    key = (q, test, setting)
                    if key in crashed or (setting == "repack, -ub 1" and test == f"decode {NEW} @0"):
                        continue  # no prompt to feed in ubatches
                    v = llama_bench(bin_dir, gguf[q], targs, sargs, args.threads)
                    if v is None:
                        crashed.add(key)
                        log(f"llama.cpp {q} {test} [{setting}]: crashed")
                        continue  # the next setting, in the same round
                    llama.setdefault(key, []).append(v)
                    log(f"llama.cpp {q} {test} [{setting}]: {v:.2f} tok/s")
                    if not args.all_settings:
                        break  # the first setting that runs is the one timed
        for name, (d, _) in decoders.items():
            d.once()
            d.once_from_empty()
            ours[name].setdefault("prefill", []).append(PROMPT / d.prefill[-1])
            ours[name].setdefault("decode@300", []).append((NEW - 1) / d.decode[-1])
            ours[name].setdefault("decode@0", []).append(NEW / d.decode_empty[-1])
            log(f"{name}: prefill {PROMPT / d.prefill[-1]:.1f} tok/s, decode @{PROMPT} {(NEW - 1) / d.decode[-1]:.2f}, "
                f"@0 {NEW / d.decode_empty[-1]:.2f} tok/s")
        seconds, image_tokens = mtmd_encode(bin_dir, gguf[quants[0]], gguf["mmproj"], image, args.threads)
        mtmd.append(seconds)
        log(f"llama.cpp mmproj f16 448 encode: {seconds:.2f} s, {image_tokens} image tokens (ours: {bucket.num_tokens})")
        for name, s in vision.items():
            t = time.perf_counter()
            s.run(None, {"pixel_values": pixels})
            ours[name].setdefault("vision", []).append(time.perf_counter() - t)
            log(f"{name} 448: {ours[name]['vision'][-1]:.2f} s")

    med = statistics.median
    bandwidth = memory_bandwidth()
    rows, record = [], {"llama": {}, "ours": ours, "crashed": sorted(map(list, crashed)), "mtmd_s": mtmd}
    best: dict[str, float] = {}  # test -> llama.cpp Q4_0's fastest working setting
    for q in quants:
        read = gguf_read_bytes(src, gguf[q])
        for test in TESTS:
            cells = {s: med(llama[(q, test, s)]) for s in SETTINGS if (q, test, s) in llama}
            for s in SETTINGS:
                if (q, test, s) in crashed:
                    cells.setdefault(s, None)
            record["llama"][f"{q} {test}"] = {s: v for s, v in cells.items()}
            if q == quants[0] and any(v for v in cells.values()):
                best[test] = max(v for v in cells.values() if v)
            rows.append([f"llama.cpp {q}", test, ", ".join(f"{s}: {'crash' if v is None else f'{v:.2f}'}" for s, v in cells.items()),
                         f"{read / 1e9:.2f} GB, floor {bandwidth / read:.1f} tok/s" if test.startswith("decode") else ""])
    for name, (d, m) in decoders.items():
        read = m["graphs"]["decoder"]["sizes"]["total"]
        for test, key in ((f"prefill {PROMPT}", "prefill"), (f"decode {NEW} @0", "decode@0"), (f"decode {NEW} @{PROMPT}", "decode@300")):
            v = med(ours[name][key])
            ratio = f", {v / best[test]:.2f}x llama.cpp {quants[0]}" if test in best else ""
            rows.append([name, test, f"{v:.2f}{ratio}",
                         f"{read / 1e9:.2f} GB, floor {bandwidth / read:.1f} tok/s ({100 * v / (bandwidth / read):.0f}%)"
                         if test.startswith("decode") else ""])
    enc = med(mtmd)
    record["image_tokens"] = {"llama.cpp": image_tokens, "ours": bucket.num_tokens}
    rows.append(["llama.cpp mmproj f16", "448 image encode", f"{enc:.2f} s ({image_tokens} image tokens)", ""])
    for name in vision:
        v = med(ours[name]["vision"])
        rows.append([name, "448 image encode", f"{v:.2f} s, {enc / v:.2f}x llama.cpp's speed", ""])
    m = machine()
    date = datetime.date.today().isoformat()
    text = "\n".join([
        f"llama.cpp beside qwen3vl-compile, qwen3-vl-4b random weights, {args.threads} threads, median of {args.rounds} "
        f"alternating rounds; {date}, {m['cpu']} ({', '.join(m['cpu_flags'])}), {m['cores']} cores, {m['ram_gib']} GiB",
        f"llama.cpp {info['build_commit']} (build {info['build_number']}, from the llama-cpp-python sdist), "
        f"ONNX Runtime {ort.__version__}; copy bandwidth {bandwidth / 1e9:.1f} GB/s (numpy, read + write)",
        "",
        table(rows, ["system", "test", "tok/s (or s) by setting", "weights read per token"]),
        "",
        "Ratios are ours over llama.cpp's fastest setting that ran. The bandwidth floor is the weight bytes a decode step "
        "reads over the measured copy bandwidth.",
    ])
    print(text)
    save(args.name, {"date": date, "machine": m, "llama_cpp": info, "threads": args.threads, "rounds": args.rounds,
                     "bandwidth_bytes_per_s": bandwidth, **record}, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
