#!/usr/bin/env bash
# Talk to the assistant in the browser: set up, start the local stack on dev checkpoints (or the
# checkpoints given as `glmv stack up` options), and open the talk page. Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-dev.sh
scripts/ensure-redis.sh
exec .venv/bin/glmv stack up --open "$@"
