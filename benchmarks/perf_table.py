"""The issue-6 performance table, assembled from the results the benchmark scripts wrote
(``benchmarks/results/*.json``) and a compiled 4B bundle's manifest (compile time, peak RSS,
sizes). It runs nothing itself: rerun the scripts named in each row to refresh it.

    python benchmarks/perf_table.py --bundle /work/bench/4b-int4

``benchmarks/run_all.py`` runs every script it reads, in one go, and then this.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, table  # noqa: E402


def load(name):
    p = RESULTS / f"{name}.json"
    return json.loads(p.read_text()) if p.is_file() else None


def llamacpp_rows(r: dict | None) -> list[list[str]]:
    """Ours against llama.cpp Q4_0's fastest setting that ran, per test (llamacpp_bench.py)."""
    if not r:
        return []
    med = statistics.median
    rows = []
    for test, key in (("prefill 300", "prefill"), ("decode 128 @0", "decode@0"), ("decode 128 @300", "decode@300")):
        cells = {k: v for k, v in r["llama"][f"Q4_0 {test}"].items() if v}
        setting, best = max(cells.items(), key=lambda kv: kv[1])
        ours = [(name.rsplit(" ", 1)[-1], med(v[key])) for name, v in r["ours"].items() if key in v]
        rows.append([f"{test.replace('@', 'tokens at depth ')} vs llama.cpp (llamacpp_bench.py)",
                     f"llama.cpp Q4_0 {best:.2f} tok/s ({setting})",
                     "; ".join(f"block {b}: {v:.2f} tok/s = {v / best:.2f}x" for b, v in ours), ">= 1.1x llama.cpp"])
    enc = med(r["mtmd_s"])
    ours = [(name.rsplit(" ", 1)[-1], med(v["vision"])) for name, v in r["ours"].items() if "vision" in v]
    rows.append(["vision 448 image encode vs llama.cpp (llamacpp_bench.py)", f"llama.cpp f16 mmproj {enc:.2f} s",
                 "; ".join(f"{p} {v:.2f} s = {enc / v:.2f}x" for p, v in ours), ">= 1.1x llama.cpp"])
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", type=Path, default=None, help="compiled qwen3-vl-4b INT4 bundle (for compile/size rows)")
    args = ap.parse_args()
    rows = []
    for bucket in ("448", "896"):
        v = load(f"vision_qwen3-vl-4b_{bucket}")
        if v:
            int8 = v.get("ort_int8_s")
            rows.append([f"vision {bucket} bucket (vision_bench.py)", f"eager {v['eager_s']:.2f} s",
                         f"fp32 {v['ort_compiled_s']:.2f} s = {v['ort_compiled_s'] / v['eager_s']:.2f}x eager"
                         + (f"; int8 {int8:.2f} s = {int8 / v['eager_s']:.2f}x" if int8 else ""),
                         "fp32 <= 0.6x eager" + ("; int8 <= 0.35x" if int8 else "")])
    d = load("decoder_4b")
    if d:
        r = d["results"]
        g, o = r["onnxruntime-genai builder INT4"], r["qwen3vl-compile INT4"]
        b = r.get("qwen3vl-compile INT4 --block-size 128")
        t = r.get("PyTorch eager fp32")
        torch_p = f"; PyTorch fp32 {t['prefill_s']:.2f} s" if t else ""
        torch_d = f"; PyTorch fp32 {t['decode_tok_s']:.2f} tok/s" if t else ""
        rows.append(["prefill 300 tokens INT4 (decoder_bench.py)", f"genai {g['prefill_s']:.2f} s{torch_p}",
                     f"{o['prefill_s']:.2f} s = {g['prefill_s'] / o['prefill_s']:.2f}x"
                     + (f"; block 128: {b['prefill_s']:.2f} s = {g['prefill_s'] / b['prefill_s']:.2f}x" if b else ""), ">= 1.5x genai"])
        rows.append(["decode 128 greedy tokens INT4 (decoder_bench.py)", f"genai {g['decode_tok_s']:.2f} tok/s{torch_d}",
                     f"{o['decode_tok_s']:.2f} tok/s = {o['decode_tok_s'] / g['decode_tok_s']:.2f}x"
                     + (f"; block 128: {b['decode_tok_s']:.2f} = {b['decode_tok_s'] / g['decode_tok_s']:.2f}x" if b else ""), ">= 1.1x genai"])
        bw = d["notes"]["bandwidth"]
        rows.append(["memory-bandwidth floor (decoder_bench.py)", f"{bw['decoder_weight_bytes'] / 1e9:.2f} GB / {bw['bytes_per_s'] / 1e9:.1f} GB/s",
                     f"floor {bw['floor_tok_s']:.1f} tok/s; achieved {100 * o['decode_tok_s'] / bw['floor_tok_s']:.0f}%", "report"])
    rows += llamacpp_rows(load("llamacpp_4b"))
    e = load("e2e_4b")
    if e:
        def med(k):
            return statistics.median(run["timings"][k] for run in e["runs"])
        genai = e.get("genai_runs") or []

        def gmed(k):
            return statistics.median(run[k] for run in genai)

        baseline = (f"genai pipeline: TTFT {gmed('time_to_first_token_s'):.2f} s, decode {gmed('decode_tokens_per_s'):.1f} tok/s, "
                    f"total {gmed('total_s'):.1f} s") if genai else "genai pipeline not run"
        rows.append(["end to end, 448 image + 20 words, 64 tokens (e2e_bench.py)", baseline,
                     f"vision {med('vision_s'):.2f} s, TTFT {med('time_to_first_token_s'):.2f} s, decode {med('decode_tokens_per_s'):.1f} tok/s, "
                     f"total {med('total_s'):.1f} s" + (f" = {gmed('total_s') / med('total_s'):.2f}x faster" if genai else "")
                     + f", RSS {e['peak_rss_bytes'] / 2**30:.1f} GiB", "beat the genai pipeline"])
    if args.bundle:
        m = json.loads((args.bundle / "manifest.json").read_text())
        c = load("compile_4b")
        what = ("compile: " + ",".join(m["options"]["buckets"]) + " + embedding + INT4 decoder"
                + (" + ort-genai graphs" if m["options"].get("target") == "ort-genai" else "") + ", all verified")
        if c and c.get("stage_seconds") == m["timings"]:  # measured around this very bundle's compile
            ours = f"{c['wall_s'] / 60:.1f} min wall, peak RSS {c['peak_rss_bytes'] / 2**30:.1f} GiB (/usr/bin/time)"
        else:
            ours = f"{sum(m['timings'].values()) / 60:.1f} min of stages, peak RSS {m['peak_rss_bytes'] / 2**30:.1f} GiB"
        d = load("decoder_4b")
        build = (d or {}).get("notes", {}).get("genai_build")
        baseline = (f"genai builder alone: {build['wall_s'] / 60:.1f} min, {build['peak_rss_bytes'] / 2**30:.1f} GiB"
                    if build else "genai builder: 2:52, 22.7 GiB (published, another CPU)")
        rows.append([what, baseline, ours, "<= 20 min, <= 16 GB"])
        size = sum(m["files"][f]["bytes"] for k in ("decoder", "embedding") for f in [m["graphs"][k]["file"], *m["graphs"][k]["data_files"]])
        rows.append(["bundle size, decoder + embedding", "genai decoder 2.65 GB", f"{size / 1e9:.2f} GB", "<= 2.6 GB"])
    print(table(rows, ["what", "baseline", "qwen3vl-compile", "target"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
