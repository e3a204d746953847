#!/usr/bin/env bash
# Sets everything up (idempotent) and serves the embedded default model on 127.0.0.1:8000.
# Arguments go to `runtime serve` (e.g. a model path, --port 9000, --host 0.0.0.0).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/runtime serve "$@"
