#!/usr/bin/env bash
# Create .venv (once) and install the project with everything it needs to compile, run and
# test. torch is pinned first to the CPU wheel on this machine's disk: an unpinned torch
# pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
stamp="$VENV/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ -f "$stamp" ]; then exit 0; fi
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q torch==2.13.0
"$VENV/bin/python" -m pip install -q -e ".[compile,genai,sign,serve,ray,test]"
rm -f "$VENV"/.installed-*
touch "$stamp"
