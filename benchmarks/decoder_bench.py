"""Text decoder, 4B scale: our INT4 decoder vs onnxruntime-genai's builder INT4 decoder (and
optionally PyTorch eager), side by side in one run, same machine, same threads.

    python benchmarks/decoder_bench.py --bundle /work/bench/4b-int4 --genai /work/bench/genai-int4 \
        [--build-genai] [--torch] --threads 2

Workload (as in the issue), run round-robin over the systems: a 300-token prompt (prefill: time to the first logits) and 128
greedy tokens (decode tokens/s). Both ONNX decoders run through the same host loop
(``DecoderSession``: one preallocated KV buffer per layer bound as past and present, the
setup under which onnxruntime-genai's own loop was measured equally fast), fed the same
``inputs_embeds`` from our embedding graph. onnxruntime-genai's decoder computes lm_head for
every prompt position (its design); ours for the last one only.

``--build-genai`` runs onnxruntime-genai's model builder (INT4, CPU, exclude_embeds) on the
bundle's source checkpoint under /usr/bin/time (wall time and peak RSS). ``--torch`` runs
Hugging Face eager fp32 on the same workload in a subprocess (it needs ~17 GB).
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, run_timed, save, table  # noqa: E402

PROMPT, NEW = 300, 128
BUILD_RECORD = "qwen3vl_bench_build.json"  # the builder's wall time and peak RSS, kept beside its output


def _session(path, threads):
    from qwen3vl_compile.runtime.session import ort_session

    return ort_session(path, threads)


class OnnxDecoder:
    """One decoder loaded once; :meth:`once` runs the workload one time."""

    def __init__(self, decoder_path, embed_session, threads, head_dim, ids):
        from qwen3vl_compile.runtime.decoder_session import DecoderSession

        self.sess = DecoderSession(decoder_path, max_length=PROMPT + NEW + 8, session=_session(decoder_path, threads), head_dim=head_dim)
        hidden = self.sess.hidden
        self.embed_session = embed_session
        self.no_img = {"image_features": np.zeros((0, hidden), np.float32), "deepstack_features": np.zeros((3, 0, hidden), np.float32)}
        self.prompt_embeds = self.embed(ids)
        self.pos = np.broadcast_to(np.arange(PROMPT), (3, 1, PROMPT)).copy()
        self.deep = np.zeros((self.sess.levels, 1, PROMPT, hidden), np.float32) if self.sess.levels else None
        self.prefill, self.decode, self.decode_empty, self.tokens = [], [], [], None

    def embed(self, tokens):
        return self.embed_session.run(["inputs_embeds"], {"input_ids": np.asarray(tokens, np.int64)[None], **self.no_img})[0]

    def once(self):
        t = time.perf_counter()
        logits = self.sess.prefill(self.prompt_embeds, self.pos, self.deep)
        self.prefill.append(time.perf_counter() - t)
        out = [int(np.argmax(logits[0, -1]))]
        t = time.perf_counter()
        for i in range(NEW - 1):
            logits = self.sess.step(self.embed([out[-1]]), np.full((3, 1, 1), PROMPT + i, np.int64))
            out.append(int(np.argmax(logits[0, -1])))
        self.decode.append(time.perf_counter() - t)
        self.tokens = out

    def once_from_empty(self):
        """Decode NEW tokens from an almost empty cache (one prompt token), as llama-bench's tg test does."""
        logits = self.sess.prefill(self.prompt_embeds[:, :1], self.pos[:, :, :1], None if self.deep is None else self.deep[:, :, :1])
        tok = int(np.argmax(logits[0, -1]))
        t = time.perf_counter()
        for i in range(NEW):
            logits = self.sess.step(self.embed([tok]), np.full((3, 1, 1), 1 + i, np.int64))
            tok = int(np.argmax(logits[0, -1]))
        self.decode_empty.append(time.perf_counter() - t)

    def result(self):
        return {"prefill_s": float(np.median(self.prefill)), "decode_tok_s": (NEW - 1) / float(np.median(self.decode)),
                "tokens": self.tokens, "prefill_runs": self.prefill, "decode_runs": self.decode,
                **({"decode_empty_tok_s": NEW / float(np.median(self.decode_empty)), "decode_empty_runs": self.decode_empty}
                   if self.decode_empty else {})}


TORCH_SCRIPT = r"""
import json, sys, time, resource, torch, numpy as np
from transformers import Qwen3VLForConditionalGeneration, DynamicCache
path, threads, prompt, new = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
model = Qwen3VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
ids = torch.tensor(json.loads(sys.argv[5]))[None]
with torch.no_grad():
    cache = DynamicCache(config=model.config.text_config)
    t = time.perf_counter()
    out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    prefill = time.perf_counter() - t
    tok = out.logits[0, -1].argmax().view(1, 1)
    t = time.perf_counter()
    for i in range(new - 1):
        out = model(input_ids=tok, past_key_values=cache, use_cache=True)
        tok = out.logits[0, -1].argmax().view(1, 1)
    decode = time.perf_counter() - t
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"prefill_s": prefill, "decode_tok_s": (new - 1) / decode, "peak_rss_bytes": rss}))
"""


def quantization_error(source: str, blocks=(32, 64, 128)) -> dict[int, float]:
    """Relative RMS error of INT4-dequantized weights (layer 0 mlp.gate_proj) per block size:
    the accuracy side of the block-size lever, independent of random-weight logits."""
    from qwen3vl_compile.model.checkpoint import Checkpoint
    from qwen3vl_compile.export.quantize import dequantize_int4, quantize_int4

    ck = Checkpoint.open(source)
    w = ck.tensor(ck.find("layers.0.mlp.gate_proj.weight", ("model.language_model.",))).float().numpy().T.copy()
    out = {}
    for b in blocks:
        d = dequantize_int4(*quantize_int4(w, b), w.shape[0])
        out[b] = float(np.sqrt(((d - w) ** 2).mean() / (w**2).mean()))
    return out


def memory_bandwidth(gib: float = 1.0, runs: int = 5) -> float:
    """Bytes per second moved by a large numpy copy (read + write counted), best of ``runs``."""
    a = np.ones(int(gib * 2**30) // 4, np.float32)
    b = np.empty_like(a)
    best = float("inf")
    for _ in range(runs):
        t = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - t)
    return 2 * a.nbytes / best


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", required=True, type=Path)
    ap.add_argument("--genai", type=Path, default=None)
    ap.add_argument("--build-genai", action="store_true")
    ap.add_argument("--torch", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--name", default="decoder_4b")
    ap.add_argument("--extra", action="append", default=[], metavar="LABEL=DECODER.onnx",
                    help="another of our decoders to time in the same run (e.g. built with --block-size 128)")
    args = ap.parse_args()

    manifest = json.loads((args.bundle / "manifest.json").read_text())
    spec = manifest["graphs"]["decoder"]["spec"]
    source = manifest["source"]["path"]
    results, notes = {}, {}
    if args.build_genai:
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", source, "-o", str(args.genai),
               "-p", "int4", "-e", "cpu", "--extra_options", "exclude_embeds=true"]
        wall, rss, _ = run_timed(cmd)
        notes["genai_build"] = {"wall_s": wall, "peak_rss_bytes": rss, "date": datetime.date.today().isoformat()}
        (args.genai / BUILD_RECORD).write_text(json.dumps(notes["genai_build"]) + "\n")
    elif args.genai and (args.genai / BUILD_RECORD).is_file():  # measured when that decoder was built
        notes["genai_build"] = json.loads((args.genai / BUILD_RECORD).read_text())
    embed_session = _session(args.bundle / "embedding.onnx", args.threads)
    ids = np.random.default_rng(0).integers(0, 150000, PROMPT).tolist()
    paths = {"qwen3vl-compile INT4": args.bundle / "decoder.onnx"}
    for extra in args.extra:
        label, path = extra.split("=", 1)
        paths[label] = Path(path)
    if args.genai:
        paths["onnxruntime-genai builder INT4"] = args.genai / "model.onnx"
    decoders = {k: OnnxDecoder(p, embed_session, args.threads, spec["head_dim"], ids) for k, p in paths.items()}
    # Round-robin: each repeat runs every decoder once, so background load and turbo
    # behaviour spread over all of them instead of biasing whichever runs last.
    for _ in range(args.repeats):
        for d in decoders.values():
            d.once()
    for k, d in decoders.items():
        results[k] = d.result()
    del decoders, embed_session
    if args.torch:
        proc = subprocess.run([sys.executable, "-c", TORCH_SCRIPT, source, str(args.threads), str(PROMPT), str(NEW), json.dumps(ids)],
                              capture_output=True, text=True)
        if proc.returncode:
            sys.stderr.write(proc.stderr[-2000:])
        else:
            results["PyTorch eager fp32"] = json.loads(proc.stdout.strip().splitlines()[-1])

    notes["int4_weight_rel_rms_error"] = quantization_error(source)
    bandwidth = memory_bandwidth()
    weight_bytes = manifest["graphs"]["decoder"]["sizes"]["total"]
    floor_tok_s = bandwidth / weight_bytes
    notes["bandwidth"] = {"bytes_per_s": bandwidth, "decoder_weight_bytes": weight_bytes, "floor_tok_s": floor_tok_s}
    base = results.get("onnxruntime-genai builder INT4")
    rows = []
    for name, r in results.items():
        row = [name, f"{r['prefill_s']:.2f}", f"{PROMPT / r['prefill_s']:.1f}", f"{r['decode_tok_s']:.2f}"]
        if base:
            row += [f"{base['prefill_s'] / r['prefill_s']:.2f}x", f"{r['decode_tok_s'] / base['decode_tok_s']:.2f}x"]
        rows.append(row)
    header = ["system", f"prefill {PROMPT} tok (s)", "prefill tok/s", f"decode tok/s ({NEW} greedy)"]
    if base:
        header += ["prefill speed vs genai", "decode speed vs genai"]
    date = datetime.date.today().isoformat()
    m = machine()
    lines = [f"Decoder, qwen3-vl-4b random weights, {args.threads} threads, median of {args.repeats}; {date}, {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB", "", table(rows, header)]
    if "genai_build" in notes:
        lines.append(f"\nonnxruntime-genai builder (INT4): wall {notes['genai_build']['wall_s']:.0f} s, peak RSS {notes['genai_build']['peak_rss_bytes'] / 2**30:.1f} GiB")
    g = manifest["graphs"]["decoder"]
    lines.append(f"qwen3vl-compile decoder: {g['sizes']['total'] / 1e9:.2f} GB on disk, build {g['seconds']['total']:.0f} s, build peak RSS {g['peak_rss_bytes'] / 2**30:.2f} GiB")
    lines.append("INT4 weight error (relative RMS, layer 0 gate_proj) by block size: " + ", ".join(
        f"{b}: {e:.4f}" for b, e in notes["int4_weight_rel_rms_error"].items()))
    ours = results["qwen3vl-compile INT4"]["decode_tok_s"]
    lines.append(
        f"memory-bandwidth floor: {weight_bytes / 1e9:.2f} GB of weights read per decode step / {bandwidth / 1e9:.1f} GB/s "
        f"(numpy copy) = {floor_tok_s:.1f} tok/s at most; ours achieves {ours:.2f} tok/s = {100 * ours / floor_tok_s:.0f}% of it"
    )
    if base:
        a, b = results["qwen3vl-compile INT4"]["tokens"], base["tokens"]
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        lines.append(f"greedy tokens: ours and onnxruntime-genai's agree on the first {same} of {len(a)} (same INT4 recipe, same inputs)")
    if "PyTorch eager fp32" in results:
        lines.append(f"PyTorch eager fp32 peak RSS {results['PyTorch eager fp32']['peak_rss_bytes'] / 2**30:.1f} GiB")
    text = "\n".join(lines)
    print(text)
    save(args.name, {"date": date, "machine": m, "threads": args.threads, "results": results, "notes": notes}, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
