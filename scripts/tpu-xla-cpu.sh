#!/usr/bin/env bash
# The TPU plugin on XLA:CPU: torch-xla with PJRT_DEVICE=CPU compiles and runs the same XLA programs
# a TPU would, on the host. torch-xla pins its own torch (2.9 for torch-xla 2.9), so this uses its
# own environment, .venv-xla (made here on first use; a few GB: PyPI's torch 2.9 is the CUDA build,
# whose libraries it needs to import even on a machine without a GPU).
#   bash scripts/tpu-xla-cpu.sh [setup] [conformance] [e2e]     (default: all three)
# Results: $OUT (default xla-cpu-results/): conformance-tpu.json and the logs.
set -uo pipefail
cd "$(dirname "$0")/.."
V=.venv-xla PY=.venv-xla/bin/python OUT=${OUT:-xla-cpu-results}
mkdir -p "$OUT"
export PJRT_DEVICE=CPU OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
stages=("$@")
[ $# -gt 0 ] || stages=(setup conformance e2e)
for stage in "${stages[@]}"; do
  case $stage in
    setup)
      [ -x $PY ] || python3 -m venv $V
      $PY -c "import torch_xla" 2>/dev/null || {
        $PY -m pip install -q "pip>=24" torch==2.9.0 torch-xla==2.9.0 || exit 1
      }
      # runtime's own dependencies without letting any of them move torch; xgrammar's wants a newer one.
      $PY -m pip install -q "transformers>=4.46" "tokenizers>=0.21" "pluggy>=1.5" "importlib-metadata>=6" \
        "packaging>=23" "pydantic>=2.6" "safetensors>=0.4" "gguf>=0.10" "jinja2>=3.1" "tqdm>=4.66" "litestar>=2.12" \
        "uvicorn>=0.30" "prometheus-client>=0.20" "httpx>=0.27" "pyzmq>=25" "msgspec>=0.18" "pillow>=10" "pytest>=8,<9" \
        "apache-tvm-ffi>=0.1.11" && $PY -m pip install -q --no-deps "xgrammar>=0.2.9" \
        && $PY -m pip install -q --no-deps -e . -e ./plugins/cpu -e ./plugins/tpu -e ./conformance || exit 1 ;;
    conformance)
      $PY -m pytest -p no:cacheprovider -q --pyargs runtime_conformance --runtime-platform tpu \
        --runtime-report "$OUT/conformance-tpu.json" --durations=20 2>&1 | tee "$OUT/conformance.log" | tail -60 ;;
    e2e)
      $PY -m pytest -p no:cacheprovider -q -rsP plugins/tpu/tests/test_xla_cpu.py 2>&1 | tee "$OUT/e2e.log" | tail -30 ;;
    *) echo "unknown stage $stage (setup, conformance, e2e)"; exit 2 ;;
  esac
done
