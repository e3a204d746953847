#!/usr/bin/env bash
# Sets everything up (idempotent) and runs the whole test suite on the CPU, in parallel.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# One torch thread per test process: the xdist workers (and the servers and engines they start)
# already fill the cores, and OpenMP threads that outnumber cores spin at each barrier waiting for
# a descheduled peer (measured here: 2 threads under contention decode 12x slower than 1).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/python -m pytest -n "${PYTEST_WORKERS:-2}" --dist loadgroup -q "$@"
