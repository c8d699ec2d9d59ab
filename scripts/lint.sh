#!/usr/bin/env bash
# Static checks: ruff, compose.yaml against the compose spec, hadolint on every Dockerfile (all offline).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check .
.venv/bin/check-jsonschema --builtin-schema vendor.compose-spec compose.yaml
find . -name Dockerfile -not -path "./.venv/*" -print0 | sort -z | xargs -0 -n1 .venv/bin/hadolint
echo "lint: ruff, compose schema and hadolint clean"
