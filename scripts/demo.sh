#!/usr/bin/env bash
# Install (if needed), compile the embedded tiny model (a small Qwen3-VL trained on synthetic
# questions about drawn shapes, see scripts/train_tiny.py) and ask it which of the two bundled
# sample images (256x256: served by the 256 bucket) has more shapes. It answers "second".
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
OUT=${OUT:-out/tiny}
mkdir -p "$(dirname "$OUT")"   # the compiler refuses a missing parent (a typo guard); out/ is not in git
.venv/bin/qwen3vl-compile --model tiny --buckets 256,448 -o "$OUT" --force -v
.venv/bin/qwen3vl-compile inspect "$OUT"
.venv/bin/qwen3vl-run "$OUT" --image qwen3vl_compile/assets/sample.png --image qwen3vl_compile/assets/sample2.png \
    --prompt "Which image has more shapes, the first or the second?" --max-new-tokens 8
