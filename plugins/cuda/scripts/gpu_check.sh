#!/usr/bin/env bash
# The GPU checks of runtime-cuda and the runtime-triton kernels it runs, on a machine with an NVIDIA
# GPU and the packages installed (runtime, runtime-cpu, runtime-triton, runtime-cuda, runtime-conformance).
#   tests:     the plugin's tests ($TESTS: some of them), kernels and attention compiled for the GPU, then end to end
#              (the conformance suite on `cuda`; tiny models and the embedded GGUF against `cpu`)
#   attention: the attention kernel benchmark
#   decode:    the Llama-3-8B-shaped decode benchmark (writes a ~16 GB random checkpoint to MODEL_DIR)
#   fp8:       the fp8 linear microbenchmark (Llama-3-8B shapes)
#   llama8b:   issue 5's figures: copy bandwidth; runtime with CUDA graphs (batch 1, profile, 1000
#              requests, mixed lengths); runtime --enforce-eager at batch 1; HF generate() at 1 and 256
# Usage: plugins/cuda/scripts/gpu_check.sh [STAGE...]   (default: all three). Results go to $OUT.
set -uo pipefail
cd "$(dirname "$0")/../../.."
PY=${PYTHON:-python3}
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 RUNTIME_CUDA_CONFORMANCE_REPORT="$OUT/conformance-cuda.json"
stages=("$@")
[ $# -gt 0 ] || stages=(tests attention decode)
for stage in "${stages[@]}"; do
  case $stage in
    tests) timeout "${TEST_TIMEOUT:-420}" "$PY" -m pytest ${TESTS:-plugins/cuda/tests} -p no:cacheprovider -rs -v --durations=15 \
             2>&1 | tee "$OUT/tests.log" ;;
    attention) timeout 90 "$PY" plugins/cuda/benchmarks/attention_kernel.py --json "$OUT/attention.json" \
             2>&1 | tee -a "$OUT/bench.log" ;;
    decode) timeout 300 "$PY" plugins/cuda/benchmarks/decode_llama8b.py --dir "${MODEL_DIR:-/tmp/llama8b}" \
             --json "$OUT/decode.json" 2>&1 | tee -a "$OUT/bench.log" ;;
    fp8) timeout 120 "$PY" plugins/cuda/benchmarks/fp8_linear.py --out "$OUT/fp8-linear.json" 2>&1 | tee -a "$OUT/bench.log" ;;
    llama8b)
      B=plugins/cuda/benchmarks M=${MODEL_DIR:-/tmp/llama8b}
      timeout 60 "$PY" $B/baselines_llama8b.py bandwidth --json "$OUT/bandwidth.json" 2>&1 | tee -a "$OUT/bench.log"
      timeout 420 "$PY" $B/baselines_llama8b.py runtime --dir "$M" --json "$OUT/runtime-graphs.json" --mixed --profile \
        2>&1 | tee -a "$OUT/bench.log"
      timeout 180 "$PY" $B/baselines_llama8b.py runtime --dir "$M" --json "$OUT/runtime-eager.json" --enforce-eager \
        --requests 0 --profile --profile-batches 1 2>&1 | tee -a "$OUT/bench.log"
      timeout 240 "$PY" $B/baselines_llama8b.py hf --dir "$M" --json "$OUT/hf.json" --hf-batches 1 256 \
        2>&1 | tee -a "$OUT/bench.log" ;;
    *) echo "unknown stage $stage (tests, attention, decode, fp8, llama8b)"; exit 2 ;;
  esac
done
