#!/usr/bin/env bash
# Sets everything up (idempotent) and runs the main job on the embedded default model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ "$#" -eq 0 ]; then
  set -- --chat "What is the capital of France?"
fi
exec .venv/bin/runtime generate "$@"
