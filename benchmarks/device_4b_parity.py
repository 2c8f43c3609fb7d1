"""4B-scale decoder parity, for a machine with >= 64 GB of memory (the lent device machine):
the real Qwen3-VL-4B config with random weights, our fp32 and INT4 decoders against Hugging
Face in fp32 (17.6 GB, which does not fit beside a 16 GB fp32 ONNX decoder on a 24 GB
machine), and optionally onnxruntime-genai's builder INT4 decoder on the same prompts.

    python benchmarks/device_4b_parity.py --work /tmp/w [--genai] [--threads 2] > result.json

Prints one JSON object: parity per decoder and case (max abs / rel, cosine, top-1), build
times, and with --genai a side-by-side timing (300-token prefill, 128 greedy tokens) of the
two INT4 decoders pinned to --threads cores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--genai", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precisions", default="fp32,int4", help="decoders to build and check")
    ap.add_argument("--model", default="qwen3-vl-4b")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("QWEN3VL_COMPILE_CACHE", str(args.work / "cache"))

    import torch

    from qwen3vl_compile.model.checkpoint import Checkpoint, resolve_model_source
    from qwen3vl_compile.export.decoder import build_decoder
    from qwen3vl_compile.export.decoder_gate import DecoderOptions, verify_decoder

    out = {"torch": torch.__version__, "cpu_count": os.cpu_count()}
    t = time.perf_counter()
    ck = Checkpoint.open(resolve_model_source(args.model, log=log))
    out["materialize_s"] = time.perf_counter() - t
    builds = {p: {} for p in args.precisions.split(",") if p}
    for precision in builds:
        path = args.work / f"dec_{precision}" / "decoder.onnx"
        log(f"building {precision} decoder")
        rep = build_decoder(ck, path, precision=precision, logits="last", context_length=4096)
        builds[precision] = {"build_s": rep.details["seconds"]["total"], "bytes": rep.details["sizes"]["total"], "peak_rss": rep.details["peak_rss_bytes"]}
        log(f"verifying {precision} decoder")
        # The whole depth against its fp32 oracle (the compile gates a 4-layer slice on 24 GB).
        parity = verify_decoder(path, ck, DecoderOptions(precision), layers=ck.text_config["num_hidden_layers"])
        builds[precision]["parity"] = parity.to_json()
        log(json.dumps(builds[precision]["parity"]["cases"]))
        if precision == "fp32":
            (path.parent / "decoder.onnx.data").unlink()  # 16 GB: free the disk
    out["decoders"] = builds
    if args.genai:
        import subprocess

        gdir = args.work / "genai"
        log("building onnxruntime-genai's INT4 decoder")
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(ck.path), "-o", str(gdir),
                        "-p", "int4", "-e", "cpu", "--extra_options", "exclude_embeds=true"], check=True,
                       stdout=subprocess.DEVNULL)
        out["genai_build_s"] = time.perf_counter() - t
        log("loading the Hugging Face reference in fp32")
        reference = (ck.load_full_model(dtype=torch.float32), torch.float32)
        out["genai_parity_text"] = genai_parity(gdir / "model.onnx", ck, reference)
        del reference
        os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[: args.threads]))
        out["timing_threads"] = args.threads
        out["timing"] = {
            "qwen3vl-compile": time_decoder(args.work / "dec_int4" / "decoder.onnx", ck, args.threads),  # needs int4 built
            "onnxruntime-genai": time_decoder(gdir / "model.onnx", ck, args.threads),
        }
    print(json.dumps(out, indent=1))
    return 0


def _embeds(ck, ids):
    import torch

    w = ck.tensor(ck.find("embed_tokens.weight", ("model.language_model.",))).float()
    return torch.nn.functional.embedding(torch.as_tensor(ids), w).numpy()[None]


def genai_parity(path, ck, reference):
    """Text-only logits of onnxruntime-genai's decoder vs the fp32 reference (last position)."""
    import torch

    from qwen3vl_compile.runtime.decoder_session import DecoderSession
    from qwen3vl_compile.parity import measure

    model, _ = reference
    ids = np.random.default_rng(5).integers(0, 5000, 8)
    emb = _embeds(ck, ids)
    pos = np.broadcast_to(np.arange(8), (3, 1, 8)).copy()
    s = DecoderSession(path, max_length=64, head_dim=ck.text_config["head_dim"])
    ours = s.prefill(emb, pos)[:, -1:]
    with torch.no_grad():
        ref = model(input_ids=torch.as_tensor(ids)[None]).logits[:, -1:].numpy()
    return measure("logits", ours, ref, float("inf"), logits=True).to_json()


def time_decoder(path, ck, threads, prompt=300, new=128):

    from qwen3vl_compile.runtime.decoder_session import DecoderSession

    s = DecoderSession(path, max_length=prompt + new + 8, threads=threads, head_dim=ck.text_config["head_dim"])
    ids = np.random.default_rng(0).integers(0, 150000, prompt)
    emb = _embeds(ck, ids)
    w = ck.tensor(ck.find("embed_tokens.weight", ("model.language_model.",))).float().numpy()
    pos = np.broadcast_to(np.arange(prompt), (3, 1, prompt)).copy()
    deep = np.zeros((s.levels, 1, prompt, s.hidden), np.float32) if s.levels else None
    t = time.perf_counter()
    logits = s.prefill(emb, pos, deep)
    prefill = time.perf_counter() - t
    tok = [int(np.argmax(logits[0, -1]))]
    t = time.perf_counter()
    for i in range(new - 1):
        logits = s.step(w[tok[-1]][None, None], np.full((3, 1, 1), prompt + i, np.int64))
        tok.append(int(np.argmax(logits[0, -1])))
    decode = time.perf_counter() - t
    return {"prefill_s": prefill, "decode_tok_s": (new - 1) / decode, "tokens": tok[:16]}


if __name__ == "__main__":
    sys.exit(main())
