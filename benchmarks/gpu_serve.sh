#!/usr/bin/env bash
# The serving benchmark on a lent GPU, in stages; each stage's results go to $OUT/<stage>.tgz.
# Wheels travel in parts (.whl/NN/partNN: a split tar of vLLM 0.22.1's wheel set, litestar's and
# py-spy; .whl/boot: what the checkpoint writer needs first), the build to compare against in
# .old/ (git archive of an earlier commit). docs/serving.md has the commands that made its figures.
#   boot:    install this tree to /tmp/rt and .old/ to /tmp/rt-old; write the Llama-3-8B-shaped
#            random checkpoint to /tmp/llama8b in the background (not with NO_CHECKPOINT=1: the benchmarks
#            on made-up weights, moe, vision, structured and the sweeps, do without it)
#   bg, bg-wait: the stages in $BG_STAGES one after another, detached (on the GPU while later calls carry
#            wheels), their results under /tmp/bg-out; bg-wait awaits them (at most $WAIT_S s; then stops them
#            with BG_STOP=1) and brings back what they have written so far
#   part:    keep the carried part(s) in /tmp/parts
#   gguf:    keep the carried piece(s) of the embedded GGUF (.whl/gN/gguf.N: it is larger than one carry)
#   gguf-test: the embedded GGUF on the GPU (test_gpu_e2e.py -k gguf, RUNTIME_CUDA_GGUF), once `gguf` has kept every
#            piece: dequantized against the CPU, and its Q4_1 projections packed (WNA16) against dequantized
#   unpack:  join the parts (checked against .whl/SHA256) and install them to /tmp/site
#   before:  the earlier build served at C=64 and 256, profiled
#   serve:   $SERVERS (default: this build, then vLLM) at C=1, 16, 64, 256 (runtime profiled at 64, 256)
#   offline: this build's offline throughput on 1024 x (512, 128), with the server's engine settings
#   tests:   the CUDA plugin's GPU tests
#   tests-bg, tests-wait: the same ($TESTS: some of them; $TESTS2: more, in a second pytest beside it), detached (they
#            run while later calls carry wheels), then awaited
#   lora:    benchmarks/lora_gpu.py: runtime without LoRA, runtime with 8 adapters, vLLM with the same 8
#            (LORA_ARGS="--dir /tmp/llama8b-json --load-format dummy": made-up base weights, no checkpoint)
#   quant:   benchmarks/quant_gpu.py: a random GPTQ 4-bit (group 128) checkpoint of the Llama-3-8B shape (from the
#            config alone), then runtime bf16, runtime GPTQ (W4A16 Triton GEMM) and vLLM GPTQ-Marlin: batch-1 decode
#            and 1000 x (512, 128) offline ($QUANT_PARTS picks parts: write runtime-bf16 runtime-gptq vllm-gptq; report
#            always runs; QUANT_ARGS="--load-format dummy": runtime bf16 on made-up weights, so NO_CHECKPOINT=1 boots do)
#   spec:    benchmarks/spec_gpu.py: the embedded model as HF bf16, n-gram proposals at batch 1 and 8 (runtime,
#            vLLM), then the zero-acceptance overhead and verification step times on the Llama-3-8B shape
#            (SPEC_ARGS="--load-format dummy": made-up weights, so NO_CHECKPOINT=1 boots do; SPEC_PYSPY=1: the runtime
#            part sampled by py-spy, summarized in spec/pyspy-runtime.txt)
#   moe:     benchmarks/moe_gpu.py: an MoE model of $MOE_SHAPE (default mixtral-16l, 47 GB of bf16 weights: fits
#            an 80 GB H100; mixtral-8x7b, 93 GB, needs an H200; qwen3-30b-a3b is 61 GB), config and tokenizer in
#            $MOE_DIR (default /tmp/moe), made-up weights in both engines (load_format dummy: nothing on disk);
#            the fused_moe op alone, then runtime and vLLM: batch-1 decode against the roofline and offline
#            1000 x (512, 128). Needs `unpack` first for vLLM
#   structured: benchmarks/structured_gpu.py: the Llama-3-8B shape (made-up weights) with the embedded model's tokenizer
#            (carry .whl/tok), batch 64
#            with a JSON schema on every request: runtime plain vs constrained (the mask's step overhead), then vLLM;
#            then (STRUCTURED_PARTS with host, as by default) benchmarks/structured_host.py: the host's part of a
#            constrained step, by xgrammar fill threads
#   offload: benchmarks/offload_gpu.py on the Llama-3-8B shape: a shared-prefix workload whose prefixes need 4x the
#            device KV cache, runtime without and with --kv-offloading-size (target >= 1.5x throughput, higher
#            prefix hit rate); then preemption by recompute, swap and auto under a cache a quarter of the need
#   embed:   benchmarks/embed_gpu.py on the Llama-3-8B shape as an embedder (last token, normalized): runtime and
#            vLLM (runner pooling) offline, 2048 x 512-token prompts, sequences/s, then the report (ratio and the
#            cosine between the two engines' vectors). Needs `unpack` first for vLLM
#   wna16-sweep: benchmarks/kernels_gpu.py wna16-sweep at $SWEEP_ROWS rows (default 1 4 16): the W4A16 plans
#            against each other and cuBLAS bf16 (what wna16.plan is tuned from; SWEEP_ARGS="--only pairs": the pairs plans)
#   det-sweep: benchmarks/kernels_gpu.py deterministic-sweep at $DET_ROWS rows (default 1 16 64 256 2048): the
#            batch-invariant matmul's plans that sum in the current plan's order, against cuBLAS
#   kernels: benchmarks/kernels_gpu.py $KERNELS (default wna16 bitmask): kernels alone against their rooflines
#   moe-sweep: benchmarks/kernels_gpu.py moe-sweep on $MOE_SHAPE's experts (default mixtral-8x7b: one layer fits any
#            GPU) at $MOE_TOKENS tokens (default 1 8 32 256 2048): fused_moe's two launches under a grid of tile plans
#            (what moe.plans_for is tuned from)
#   lora-sweep: benchmarks/kernels_gpu.py lora-sweep: lora_add at decode sizes by shrink programs, beside the base matmul
#   vision:  benchmarks/vision_gpu.py: a LLaVA-1.5-7B-shaped model in /tmp/llava7b (made-up weights), one 336 px JPEG
#            and 128 random tokens per chat request, 128 out, at C=16 and 64: runtime, then vLLM (needs `unpack`)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}; M=/tmp/llama8b; R=/tmp/results
mkdir -p "$OUT" /tmp/parts $R
export PYTHONUNBUFFERED=1 VLLM_USE_FLASHINFER_SAMPLER=0 PATH=/tmp/site/bin:$PATH
export PYTHONPATH=/tmp/rt:/tmp/site:/tmp/boot
pipt() { python3 -m pip install -q --no-deps --no-compile --no-index --no-build-isolation --upgrade --target "$@"; }
for stage in "$@"; do
  mkdir -p $R/$stage
  case $stage in
    boot)
      pipt /tmp/boot .whl/boot/*.whl && pipt /tmp/rt . ./plugins/cpu ./plugins/triton ./plugins/cuda ./conformance && { [ ! -d .old ] || pipt /tmp/rt-old ./.old ./.old/plugins/cpu $([ ! -d .old/plugins/triton ] || echo ./.old/plugins/triton) ./.old/plugins/cuda; } || exit 1
      [ "${NO_CHECKPOINT:-0}" = 1 ] || setsid nohup python3 -c "import sys; sys.path.insert(0, 'plugins/cuda/benchmarks'); from decode_llama8b import write_checkpoint; from pathlib import Path; write_checkpoint(Path('$M')); print('checkpoint written')" > /tmp/model.log 2>&1 < /dev/null &
      nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv ;;
    part) cp .whl/*/part* /tmp/parts/ && ls -la /tmp/parts ;;
    gguf) cp .whl/*/gguf.* /tmp/parts/ && ls -la /tmp/parts ;;
    gguf-test)
      [ -e /tmp/smollm2.gguf ] || cat /tmp/parts/gguf.* > /tmp/smollm2.gguf
      RUNTIME_CUDA_GGUF=/tmp/smollm2.gguf timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -rs plugins/cuda/tests/test_gpu_e2e.py -k gguf \
        2>&1 | tail -15 | tee $R/gguf-test/run.log ;;
    unpack)
      (cd /tmp/parts && sed 's|^\(\S*\)  .*/|\1  |' "$OLDPWD/.whl/SHA256" | sha256sum -c --quiet) || exit 1
      cat /tmp/parts/part* | tar -x -C /tmp && pipt /tmp/site /tmp/all/*.whl || exit 1
      cat /tmp/model.log; python3 -c "import vllm, litestar, zmq, msgspec; print('vllm', vllm.__version__, 'litestar ok')" ;;
    before)
      python3 benchmarks/serve_vs_vllm.py --model $M --out $R/before --servers runtime-old --old-runtime /tmp/rt-old \
        --concurrency 64 256 --profile 64 256 2>&1 | tee $R/before/run.log ;;
    serve)
      python3 benchmarks/serve_vs_vllm.py --model $M --out $R/serve --servers ${SERVERS:-runtime vllm} --profile 64 256 \
        --vllm-args "--dtype bfloat16" ${SERVE_ARGS:-} 2>&1 | tee $R/serve/run.log ;;
    offline)
      # The server's engine settings (512 sequences, 8192 tokens a step) on the served workload's shape.
      timeout 300 python3 plugins/cuda/benchmarks/baselines_llama8b.py runtime --dir $M --json $R/offline/offline.json \
        --requests 1024 --max-num-batched-tokens 8192 2>&1 | tail -20 | tee $R/offline/run.log ;;
    tests)
      OUT=$R/tests TEST_TIMEOUT=${TEST_TIMEOUT:-420} plugins/cuda/scripts/gpu_check.sh tests 2>&1 | tail -40 ;;
    tests-bg)
      # The 8B deterministic test reuses boot's checkpoint: wait until it is written. $TESTS2, when set,
      # runs beside $TESTS in a second pytest (the tests size their own KV caches, so two fit one GPU).
      for n in 1 2; do
        tests=$([ $n = 1 ] && echo "${TESTS:-}" || echo "${TESTS2:-}")
        [ $n = 2 ] && [ -z "$tests" ] && break
        setsid nohup bash -c "for _ in \$(seq 600); do grep -q written /tmp/model.log && break; sleep 1; done; \
          TESTS='$tests' RUNTIME_LLAMA8B_DIR=$M OUT=$R/tests-wait/$n TEST_TIMEOUT=${TEST_TIMEOUT:-1200} \
          plugins/cuda/scripts/gpu_check.sh tests; touch /tmp/tests.done$n" > /tmp/tests$n.log 2>&1 < /dev/null &
        [ -n "${TESTS2:-}" ] || touch /tmp/tests.done2
      done ;;
    bg)
      setsid nohup bash -c "OUT=/tmp/bg-out TAG=bg bash $0 ${BG_STAGES:-}; touch /tmp/bg.done" > /tmp/bg.log 2>&1 < /dev/null &
      echo $! > /tmp/bg.pid ;;
    bg-wait)
      for _ in $(seq ${WAIT_S:-300}); do [ -e /tmp/bg.done ] && break; sleep 1; done
      [ -e /tmp/bg.done ] || [ "${BG_STOP:-0}" != 1 ] || { kill -- -"$(cat /tmp/bg.pid)"; echo "bg stopped"; }
      grep -v "it/s]" /tmp/bg.log | tail -60; cp /tmp/bg-out/*.tgz "$OUT/" 2>/dev/null
      for stage in ${BG_STAGES:-}; do tar czf "$OUT/$stage-partial.tgz" -C $R $stage 2>/dev/null; done ;;
    tests-wait)
      for _ in $(seq ${WAIT_S:-300}); do [ -e /tmp/tests.done1 ] && [ -e /tmp/tests.done2 ] && break; sleep 1; done
      grep -hE "passed|failed|PASSED|FAILED|ERROR|SKIPPED" /tmp/tests1.log /tmp/tests2.log 2>/dev/null | tail -80 ;;
    lora)
      for part in "runtime --adapters 0 --json $R/lora/runtime-base.json" "runtime --json $R/lora/runtime-lora.json" \
                  "vllm --json $R/lora/vllm-lora.json"; do
        timeout 300 python3 benchmarks/lora_gpu.py $part --dir $M ${LORA_ARGS:-} 2>&1 | grep -v "it/s]" | tail -15 | tee -a $R/lora/run.log
      done ;;
    quant)
      for part in ${QUANT_PARTS:-write runtime-bf16 runtime-gptq vllm-gptq}; do
        timeout ${QUANT_TIMEOUT:-540} python3 benchmarks/quant_gpu.py $part --dir $M --out $R/quant ${QUANT_ARGS:-} 2>&1 | grep -v "it/s]" \
          | tail -15 | tee -a $R/quant/run.log
      done
      python3 benchmarks/quant_gpu.py report --out $R/quant | tee -a $R/quant/run.log ;;
    spec)
      [ -e /tmp/smollm2.gguf ] || cat /tmp/parts/gguf.* > /tmp/smollm2.gguf
      for part in ${SPEC_PARTS:-convert runtime vllm verify}; do
        # SPEC_PYSPY=1: the runtime part under py-spy (where a verification step's host time goes).
        spy=(); [ "${SPEC_PYSPY:-0}" = 1 ] && [ $part = runtime ] && spy=(py-spy record --rate 500 --format raw --output $R/spec/pyspy-runtime.raw --)
        timeout 300 "${spy[@]}" python3 benchmarks/spec_gpu.py $part --gguf /tmp/smollm2.gguf --json $R/spec/$part.json --llama-dir $M ${SPEC_ARGS:-} 2>&1 | grep -v "it/s]" \
          | tail -15 | tee -a $R/spec/run.log
      done
      [ ! -e $R/spec/pyspy-runtime.raw ] || python3 -c "import sys; sys.path.insert(0, 'benchmarks'); from pathlib import Path; \
        from serve_vs_vllm import summarize_profile; print(summarize_profile(Path('$R/spec/pyspy-runtime.raw'), 60))" > $R/spec/pyspy-runtime.txt ;;
    moe)
      D=${MOE_DIR:-/tmp/moe}; SHAPE="--shape ${MOE_SHAPE:-mixtral-16l} ${MOE_ARGS:-}"
      python3 benchmarks/moe_gpu.py write $SHAPE --dir $D 2>&1 | tail -3 | tee -a $R/moe/run.log
      for part in ${MOE_PARTS:-kernel runtime vllm}; do
        timeout 600 python3 benchmarks/moe_gpu.py $part $SHAPE --dir $D --json $R/moe/$part.json 2>&1 | grep -v "it/s]" \
          | tail -15 | tee -a $R/moe/run.log
      done ;;
    structured)
      for part in ${STRUCTURED_PARTS:-prepare runtime vllm host}; do
        [ $part = host ] && continue
        timeout 480 python3 benchmarks/structured_gpu.py $part --json $R/structured/$part.json --tokenizer .whl/tok 2>&1 \
          | grep -v "it/s]" | tail -15 | tee -a $R/structured/run.log
      done
      # The host's part of a constrained step on this machine's CPU, by xgrammar fill threads.
      [[ " ${STRUCTURED_PARTS:-host} " = *" host "* ]] && timeout 300 python3 benchmarks/structured_host.py --model /tmp/llama8b-json --threads 1 4 auto \
        --json $R/structured/host.json 2>&1 | tail -4 | tee -a $R/structured/run.log ;;
    offload)
      for part in ${OFFLOAD_PARTS:-offload swap}; do
        timeout 540 python3 benchmarks/offload_gpu.py $part --dir $M --json $R/offload/$part.json 2>&1 | grep -v "it/s]" \
          | tail -15 | tee -a $R/offload/run.log
      done
      python3 benchmarks/offload_gpu.py report --json $R/offload/report.json | tee -a $R/offload/run.log ;;
    embed)
      for part in runtime vllm report; do
        timeout 480 python3 benchmarks/embed_gpu.py $part --dir $M --json $R/embed/$part.json ${EMBED_ARGS:-} 2>&1 \
          | grep -v "it/s]" | tail -15 | tee -a $R/embed/run.log
      done ;;
    wna16-sweep)
      timeout ${SWEEP_TIMEOUT:-540} python3 benchmarks/kernels_gpu.py wna16-sweep --sweep-rows ${SWEEP_ROWS:-1 4 16} \
        ${SWEEP_ARGS:-} --json $R/wna16-sweep/sweep.json 2>&1 | tee $R/wna16-sweep/run.log ;;
    det-sweep)
      timeout ${SWEEP_TIMEOUT:-540} python3 benchmarks/kernels_gpu.py deterministic-sweep --det-rows ${DET_ROWS:-1 16 64 256 2048} --json $R/det-sweep/sweep.json \
        2>&1 | tee $R/det-sweep/run.log ;;
    kernels)
      timeout ${SWEEP_TIMEOUT:-540} python3 benchmarks/kernels_gpu.py ${KERNELS:-wna16 bitmask} --json $R/kernels/kernels.json \
        2>&1 | tee $R/kernels/run.log ;;
    moe-sweep)
      timeout ${SWEEP_TIMEOUT:-540} python3 benchmarks/kernels_gpu.py moe-sweep --moe-shape ${MOE_SHAPE:-mixtral-8x7b} \
        ${MOE_TOKENS:+--moe-tokens $MOE_TOKENS} --json $R/moe-sweep/sweep.json 2>&1 | tee $R/moe-sweep/run.log ;;
    lora-sweep)
      timeout ${SWEEP_TIMEOUT:-540} python3 benchmarks/kernels_gpu.py lora-sweep --json $R/lora-sweep/sweep.json \
        2>&1 | tee $R/lora-sweep/run.log ;;
    lora-trace)
      timeout ${SWEEP_TIMEOUT:-300} python3 benchmarks/kernels_gpu.py lora-trace --json $R/lora-trace/trace.json \
        2>&1 | cut -c1-2000 | tee $R/lora-trace/run.log ;;
    vision)
      [ -e /tmp/llava7b/config.json ] || timeout 600 python3 benchmarks/vision_gpu.py write --dir /tmp/llava7b 2>&1 | tail -3
      for part in ${VISION_PARTS:-runtime vllm}; do
        timeout 540 python3 benchmarks/vision_gpu.py $part --dir /tmp/llava7b --json $R/vision/$part.json 2>&1 \
          | grep -v "it/s]" | tail -15 | tee -a $R/vision/run.log
      done
      python3 benchmarks/vision_gpu.py report --out $R/vision | tee -a $R/vision/run.log ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
  tar czf "$OUT/$stage-${TAG:-run}.tgz" -C $R $stage
done
