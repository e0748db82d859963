#!/usr/bin/env bash
# One-shot GPU check: at most 5 minutes on one GPU, prints one table (bench/gpu_check.py).
#   bash bench/gpu_check.sh            # on the GPU machine
#   bash bench/gpu_check.sh --dry-run  # tiny model on CPU (the test suite runs this)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
exec timeout 300 "$PY" bench/gpu_check.py "$@"
