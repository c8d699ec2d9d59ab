#!/usr/bin/env bash
# The test command: set up the venv, make sure Redis answers and Chromium is installed (the browser
# tests skip, saying why, where it cannot be), lint, then run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-dev.sh
scripts/ensure-redis.sh
scripts/ensure-chromium.sh
scripts/lint.sh
export OMP_NUM_THREADS=1
# One rerun: a failure that repeats fails the run; one that does not is reported as a rerun.
exec .venv/bin/python -m pytest -n 2 --dist loadfile -q --reruns 1 --reruns-delay 2 "$@"
