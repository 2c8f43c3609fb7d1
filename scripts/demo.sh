#!/usr/bin/env bash
# Install (if needed), compile the embedded tiny model and answer a prompt about the bundled
# sample image (448x448: served by the 448 bucket). The tiny model has random weights: its
# answer is noise, token-for-token what Hugging Face would say (the tests prove that).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
OUT=${OUT:-out/tiny}
mkdir -p "$(dirname "$OUT")"   # the compiler refuses a missing parent (a typo guard); out/ is not in git
.venv/bin/qwen3vl-compile --model tiny --buckets 224,448 -o "$OUT" --force -v
.venv/bin/qwen3vl-compile inspect "$OUT"
.venv/bin/qwen3vl-run "$OUT" --image qwen3vl_compile/assets/sample.png --prompt "Describe this image." --max-new-tokens 32
