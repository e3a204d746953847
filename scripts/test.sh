#!/usr/bin/env bash
# Sets everything up (idempotent) and runs the whole test suite on the CPU, in parallel.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -n "${PYTEST_WORKERS:-2}" --dist loadgroup -q "$@"
