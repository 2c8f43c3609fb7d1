#!/usr/bin/env bash
# Install (if needed) and run the whole test suite (the fast tier alone: -m "not slow").
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/python -m pytest -q "$@"
