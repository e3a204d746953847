#!/usr/bin/env bash
# The conformance suite on the platform plugins this machine has no hardware for, each emulated on
# the host CPU (RUNTIME_EMULATE=NAME, runtime.platform.emulation): their attention backends and
# kernels where those are plain torch, or Triton under its interpreter (rocm). It checks the ops,
# not the device: docs/platforms.md says what emulation leaves unverified.
#   bash scripts/conformance-emulated.sh [NAME...]    (default: rocm tpu gaudi metal)
# Reports go to $OUT (default conformance-emulated/): NAME.json and NAME.log.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-conformance-emulated}
mkdir -p "$OUT"
platforms=("$@")
[ $# -gt 0 ] || platforms=(rocm tpu gaudi metal)
status=0
for name in "${platforms[@]}"; do
  # TRITON_INTERPRET must be set before triton is imported (emulated rocm refuses to start without it).
  RUNTIME_EMULATE=$name TRITON_INTERPRET=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$PY" -m pytest -p no:cacheprovider -q \
    --pyargs runtime_conformance --runtime-platform "$name" --runtime-report "$OUT/$name.json" > "$OUT/$name.log" 2>&1 \
    || status=1
  tail -n 3 "$OUT/$name.log"
done
exit $status
