#!/usr/bin/env bash
# Builds a wheel of every distribution of this repository (runtime, every platform plugin,
# runtime-triton, runtime-conformance) into dist/, replacing the ones built before. Idempotent.
#   bash scripts/build-wheels.sh [pip wheel options]   e.g. --no-build-isolation (use this Python's setuptools)
# Then, in any environment (docs/install.md): pip install --find-links dist "runtime[cuda]"
# WHEEL_DIR=DIR writes elsewhere; PYTHON picks the interpreter (default: .venv's, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
OUT=${WHEEL_DIR:-dist}
# ./ so pip reads each as a directory, never as a name to look up on an index.
PROJECTS=(. ./plugins/cpu ./plugins/triton ./plugins/cuda ./plugins/rocm ./plugins/tpu ./plugins/gaudi ./plugins/metal
          ./conformance)
mkdir -p "$OUT"
# Old wheels would stay candidates for --find-links; setuptools' build/ keeps files deleted from the sources.
rm -f "$OUT"/runtime-*.whl "$OUT"/runtime_*.whl
for project in "${PROJECTS[@]}"; do rm -rf "$project/build"; done
"$PY" -m pip wheel --no-deps -q --wheel-dir "$OUT" "$@" "${PROJECTS[@]}"
ls "$OUT"/runtime*.whl
