#!/usr/bin/env bash
# Create .venv (if needed) and install every component editable, plus test and lint tools.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.glmv-installed
want=$(cat requirements-dev.txt protos/pyproject.toml protos/setup.py protos/glmvoice/v1/*.proto \
  services/*/pyproject.toml gateway/pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || [ ! -f protos/glmvoice/v1/lm_pb2.py ]; then
  # torch first, alone, so that the CPU build is chosen (requirements-dev pins the same version)
  .venv/bin/python -m pip install --quiet "torch==2.13.0"
  .venv/bin/python -m pip install --quiet -r requirements-dev.txt
  echo "$want" > "$stamp"
fi
