#!/usr/bin/env bash
# The main job on a fresh machine: set up, start the whole stack on dev checkpoints, speak one turn
# from samples/question.wav, write the reply to reply.wav, print the text and the latency.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-dev.sh
scripts/ensure-redis.sh
exec .venv/bin/glmv demo --out "${1:-reply.wav}"
