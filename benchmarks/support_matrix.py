"""Every official Qwen3-VL shape, on this machine: compiled and gated at fp32, fp16 and INT4,
greedy tokens against Hugging Face at fp32, compile memory. One row per shape.

Each shape runs at its real width on a reduced depth: the preset ``NAME:N`` is the official
config (random bf16 weights, sharded like a download) with its first N text layers, N = the
DeepStack levels + 1 (every DeepStack injection and the layer after it), the same depth the
compile-time gate uses on large models. The full vision tower is kept.

    python benchmarks/support_matrix.py --work /tmp/sm [--shapes qwen3-vl-2b,qwen3-vl-8b]
    python benchmarks/support_matrix.py --work /tmp/sm --full qwen3-vl-8b   # + whole-model INT4 compile

Per shape: (1) ``qwen3vl-compile --model NAME:N --buckets 448 --precision fp32`` (all graphs),
wall time and peak RSS; (2) greedy tokens of that bundle against Hugging Face ``generate`` in
fp32 on the same checkpoint (one image, text only; in a subprocess each, ours first and freed);
(3) ``--graphs decoder`` at fp16 and at INT4 (default options): the gate figures as the
manifest records them. ``--full NAME`` also compiles the whole model at INT4 with one bucket
(the issue's memory gate: 8B-shaped, peak RSS <= 16 GB).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, run_timed, save, table  # noqa: E402

SHAPES = ["qwen3-vl-2b", "qwen3-vl-4b", "qwen3-vl-8b", "qwen3-vl-32b", "qwen3-vl-30b-a3b", "qwen3-vl-235b-a22b"]
COMPILE = [sys.executable, "-m", "qwen3vl_compile.cli"]
NEW_TOKENS = 16


def log(msg: str) -> None:
    print(f"[{datetime.datetime.now():%H:%M:%S}] {msg}", file=sys.stderr, flush=True)


def depth(shape: str) -> int:
    from qwen3vl_compile.presets import preset_config

    return len(preset_config(shape)["vision_config"]["deepstack_visual_indexes"]) + 1


def gate_figures(bundle: Path) -> dict:
    d = json.loads((bundle / "manifest.json").read_text())["parity"]["decoder"]
    out = {"passed": d["passed"], "layers_checked": d["layers_checked"], "layers": d["layers"]}
    for key in ("logits", "logits_at_accuracy_level_4", "logits_vs_unrounded_fp32"):
        vals = [c[key] for c in d["cases"].values() if key in c]
        if vals:
            out[key] = {"max_rel": max(v["max_rel"] for v in vals), "tolerance": vals[0]["tolerance_max_rel"],
                        "min_cosine": min(v.get("cosine", 1.0) for v in vals),
                        "top1": min(v.get("top1_agreement", 1.0) for v in vals)}
    return out


def greedy(bundle: Path, model: str, image: str | None, which: str) -> list[int]:
    """One side of the greedy comparison, in this (sub)process."""
    prompt = "Describe this image." if image else "Write a short story about a lighthouse."
    images = [image] if image else []
    if which == "ours":
        from qwen3vl_compile import Pipeline

        return Pipeline.load(bundle).generate(images=images, prompt=prompt, max_new_tokens=NEW_TOKENS).token_ids
    from qwen3vl_compile.model.checkpoint import resolve_model_source
    from qwen3vl_compile.model.hf_reference import make_hf_generate

    return make_hf_generate(resolve_model_source(model))(images, prompt, NEW_TOKENS)


def greedy_subprocess(bundle: Path, model: str, image: str | None, which: str) -> list[int]:
    args = [sys.executable, __file__, "--greedy", str(bundle), model, image or "", which]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def run_shape(shape: str, work: Path) -> dict:
    n = depth(shape)
    model = f"{shape}:{n}"
    row: dict = {"shape": shape, "model": model, "layers": n}
    log(f"{model}: materialising")
    from qwen3vl_compile.model.checkpoint import resolve_model_source

    path = resolve_model_source(model)
    row["checkpoint_gib"] = round(sum(p.stat().st_size for p in path.glob("*.safetensors")) / 2**30, 2)
    from qwen3vl_compile.model.checkpoint import Checkpoint
    from qwen3vl_compile.export.decoder_gate import text_weight_bytes

    fp32_bytes = text_weight_bytes(Checkpoint.open(path), n)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if fp32_bytes > 0.6 * ram:  # an fp32 (or fp16, computed in fp32) decoder of the slice cannot be loaded here
        row["skipped"] = (f"fp32/fp16 decoders of {n} layers hold {fp32_bytes / 2**30:.0f} GiB of fp32 weights in ONNX "
                          f"Runtime, more than this machine's {ram / 2**30:.0f} GiB allows; INT4 only")
        log(f"{model}: {row['skipped']}")
        return _decoder_rows(row, shape, model, work, ("int4",))
    fp32 = work / f"{shape}-fp32"
    log(f"{model}: fp32 bundle")
    wall, rss, _ = run_timed([*COMPILE, "--model", model, "--buckets", "448", "--precision", "fp32", "-o", str(fp32), "-q"])
    row["fp32"] = {"compile_s": round(wall, 1), "peak_rss_gib": round(rss / 2**30, 2), **gate_figures(fp32)}
    from qwen3vl_compile.assets import __path__ as assets

    sample = str(Path(assets[0]) / "sample.png")
    row["greedy"] = {}
    for case, image in (("one_image", sample), ("text_only", None)):
        log(f"{model}: greedy tokens, {case}")
        ours, ref = (greedy_subprocess(fp32, model, image, w) for w in ("ours", "hf"))
        row["greedy"][case] = {"equal": ours == ref, "tokens": len(ref), "ours": ours, "hf": ref}
    shutil.rmtree(fp32)
    return _decoder_rows(row, shape, model, work, ("fp16", "int4"))


def _decoder_rows(row: dict, shape: str, model: str, work: Path, precisions) -> dict:
    for precision in precisions:
        out = work / f"{shape}-{precision}"
        log(f"{model}: {precision} decoder")
        wall, rss, _ = run_timed([*COMPILE, "--model", model, "--graphs", "decoder", "--precision", precision, "-o", str(out), "-q"])
        row[precision] = {"compile_s": round(wall, 1), "peak_rss_gib": round(rss / 2**30, 2), **gate_figures(out)}
        shutil.rmtree(out)
    log(f"{model}: {json.dumps({k: row[k] for k in ('fp32', 'fp16', 'int4') if k in row})}")
    return row


def run_full(shape: str, work: Path) -> dict:
    from qwen3vl_compile.model.checkpoint import resolve_model_source

    log(f"{shape}: materialising the whole model")
    path = resolve_model_source(shape)
    out = work / f"{shape}-int4-full"
    log(f"{shape}: whole-model INT4 compile, one bucket (448)")
    wall, rss, _ = run_timed([*COMPILE, "--model", shape, "--buckets", "448", "-o", str(out), "-q"])
    m = json.loads((out / "manifest.json").read_text())
    res = {"shape": shape, "checkpoint_gib": round(sum(p.stat().st_size for p in path.glob("*.safetensors")) / 2**30, 2),
           "compile_min": round(wall / 60, 1), "peak_rss_gib": round(rss / 2**30, 2),
           "bundle_gib": round(sum(f["bytes"] for f in m["files"].values()) / 2**30, 2), "gate": gate_figures(out),
           "timings": m["timings"]}
    shutil.rmtree(out)
    return res


def fmt(x: float) -> str:
    return f"{x:.1e}"


def markdown(rows: list[dict], full: list[dict], meta: dict) -> str:
    lines = [f"Support matrix, {meta['date']}, {meta['machine']['cpu']} ({meta['machine']['cores']} cores, "
             f"{meta['machine']['ram_gib']} GiB); `python benchmarks/support_matrix.py`. Each shape at full width, "
             "first N text layers (N = DeepStack levels + 1), random bf16 weights; gate = max relative error of the "
             "logits against Hugging Face fp32 with the decoder's own weight rounding (tolerance 1e-4), INT4 also at "
             "accuracy level 4 (int8 activations) and its cosine to the unquantized model (reported).", ""]
    body = []
    for r in rows:
        i4 = r["int4"]
        na = "not run (see below)"
        greedy = " ".join(f"{k}: {'=' if v['equal'] else 'DIFFER'} ({v['tokens']})" for k, v in r["greedy"].items()) \
            if "greedy" in r else na
        body.append([r["shape"], f"{r['layers']}", fmt(r["fp32"]["logits"]["max_rel"]) if "fp32" in r else na,
                     fmt(r["fp16"]["logits"]["max_rel"]) if "fp16" in r else na,
                     f"{fmt(i4['logits']['max_rel'])} / {i4['logits_at_accuracy_level_4']['max_rel']:.3f}",
                     f"{i4['logits_vs_unrounded_fp32']['min_cosine']:.3f}", greedy,
                     f"{r['fp32']['peak_rss_gib'] if 'fp32' in r else '-'} / {r['int4']['peak_rss_gib']}",
                     "yes" if all(r[p]["passed"] for p in ("fp32", "fp16", "int4") if p in r) else "NO"])
    lines.append(table(body, ["shape", "layers", "fp32 gate", "fp16 gate", "INT4 gate (exact / level 4)",
                              "INT4 cos vs fp32", "greedy tokens vs HF (fp32)", "peak RSS GiB (fp32 bundle / INT4 dec.)",
                              "all gates pass"]))
    for r in rows:
        if "skipped" in r:
            lines += ["", f"{r['shape']}: {r['skipped']}."]
    for f in full:
        lines += ["", f"Whole {f['shape']} ({f['checkpoint_gib']} GiB bf16 checkpoint), INT4, one 448 bucket: compile "
                  f"{f['compile_min']} min, peak RSS {f['peak_rss_gib']} GiB (/usr/bin/time), bundle {f['bundle_gib']} GiB; "
                  f"decoder gate on {f['gate']['layers_checked']} of {f['gate']['layers']} layers: exact "
                  f"{fmt(f['gate']['logits']['max_rel'])}, level 4 {f['gate']['logits_at_accuracy_level_4']['max_rel']:.3f}, "
                  f"passed {f['gate']['passed']}."]
    return "\n".join(lines)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--greedy":
        bundle, model, image, which = sys.argv[2:6]
        print(json.dumps(greedy(Path(bundle), model, image or None, which)))
        return 0
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--shapes", default=",".join(s for s in SHAPES if s != "qwen3-vl-235b-a22b"))
    ap.add_argument("--full", default="", help="shapes to compile whole at INT4 (e.g. qwen3-vl-8b)")
    ap.add_argument("--name", default="support_matrix")
    ap.add_argument("--delete-presets", action="store_true",
                    help="remove each materialised preset checkpoint once its shape is done (disk)")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    meta = {"date": datetime.date.today().isoformat(), "machine": machine()}
    rows, full = [], []

    def checkpoint_results() -> str:  # saved after every shape: a late failure loses nothing
        md = markdown(rows, full, meta)
        save(args.name, {**meta, "rows": rows, "full": full}, md)
        return md

    def done_with(model: str) -> None:
        if args.delete_presets:
            from qwen3vl_compile.model.checkpoint import resolve_model_source

            shutil.rmtree(resolve_model_source(model))

    for s in (s for s in args.shapes.split(",") if s):
        rows.append(run_shape(s, args.work))
        checkpoint_results()
        done_with(rows[-1]["model"])
    for s in (s for s in args.full.split(",") if s):
        full.append(run_full(s, args.work))
        checkpoint_results()
        done_with(s)
    print(checkpoint_results())
    return 0


if __name__ == "__main__":
    sys.exit(main())
