"""CPU matmul with int8 or int4 weights and float32 activations: which kernel to run quantized weights on.

Usage: .venv/bin/python benchmarks/cpu_int8_matmul.py [--rows 1 4 16 64] [--repeats 15] [--threads N]

Times ``y = x @ W.T`` on the embedded SmolLM2-135M's projection shapes (fused q/k/v, o, fused
gate/up, down, the 49152-row output projection) with x of M rows, for each candidate, all in
one run and interleaved (candidate after candidate inside every repeat) so a shared machine's
load drifts over all of them alike. Each timed call multiplies by another copy of the weight,
cycling through copies that together exceed the caches, as a decode step reads every layer's
weights from memory once. Prints the median microseconds per call, the speedup over float32
``F.linear``, and the largest error against float64 ``x @ dequant(W).T`` relative to the
output's largest magnitude (fp32 shows the int8 rounding of the weight itself; the dynamic
kernels round the activations to 8 bits too).

Candidates, all in PyTorch's CPU build:
- ``fp32``: ``F.linear`` on the dense float32 weight (what the CPU platform runs without ``-q``);
- ``int8pack``: ``torch._weight_int8pack_mm`` (weight-only int8, per-channel float scales,
  float32 activations; the kernel Inductor's weight-only int8 lowering calls);
- ``dynamic-fbgemm`` / ``dynamic-onednn``: ``torch.ops.quantized.linear_dynamic`` on a prepacked
  per-channel qint8 weight, activations quantized to uint8 per call;
- ``runtime-int8``: the CPU plugin's ``--quantization int8`` (``CpuInt8Method.apply``): fbgemm's
  dynamic linear on each activation row split in two exactly representable parts;
- ``runtime-int4``: the CPU plugin's packed 4-bit path (GGUF Q4_0/Q4_1/Q4_K, 4-bit GPTQ/AWQ):
  ``torch._weight_int4pack_mm_for_cpu`` on the weight rounded to 4 bits per group of 32 (its error
  column shows that coarser rounding against the int8 reference), bfloat16 activations.

``torch.ops.onednn.qlinear_pointwise`` (the PT2E path) was measured too and left out: with the
activation quantized per call it was 30-300x slower than float32 here.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
import warnings

import torch
import torch.ao.nn.quantized.dynamic  # noqa: F401  (registers torch.ops.quantized.linear_dynamic)
import torch.nn.functional as F
from runtime_cpu import int4
from runtime_cpu.quant import CpuInt8Method

COLD_BYTES = 256 << 20  # float32 bytes of the copies of each weight: beyond any last-level cache
SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536), "lm_head": (49152, 576)}


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scales = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
    return torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8), scales


def candidates(weight: torch.Tensor) -> dict:
    """Each candidate as a function of x, multiplying by its own copy of ``weight``."""
    weight = weight.clone()
    q, scales = quantize(weight)
    out = {"fp32": lambda x: F.linear(x, weight), "int8pack": lambda x: torch._weight_int8pack_mm(x, q, scales)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized tensors are deprecated; measured all the same
        qweight = torch.quantize_per_channel(q.float() * scales[:, None], scales.double(),
                                             torch.zeros(len(scales), dtype=torch.long), 0, torch.qint8)
        for engine in ("fbgemm", "onednn"):
            torch.backends.quantized.engine = engine
            packed = torch.ops.quantized.linear_prepack(qweight, None)
            out[f"dynamic-{engine}"] = lambda x, p=packed: torch.ops.quantized.linear_dynamic(x, p, False)
    method = CpuInt8Method()
    stored = method.quantize(weight)
    out["runtime-int8"] = lambda x: method.apply(stored, x)
    packed = int4.pack(*quantize_int4(weight), group_size=32)
    out["runtime-int4"] = lambda x: int4.matmul(packed, x)
    # The kernel alone at every row count (from int4.DENSE_MIN_ROWS rows the default dequantizes).
    out["int4-kernel"] = lambda x: int4.matmul(packed, x, deterministic=True)
    return out


def quantize_int4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_1's rounding: per 32 values, 16 steps from the minimum to the maximum; as the int4
    kernel's (q, scale, offset) with W = (q - 8) * scale + offset."""
    groups = weight.reshape(weight.shape[0], -1, 32)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale = ((high - low) / 15).clamp(min=1e-12)
    q = torch.round((groups - low) / scale).clamp(0, 15).reshape(weight.shape)
    return q, scale.squeeze(-1), (low + 8 * scale).squeeze(-1)


def reference(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    q, scales = quantize(weight)
    return x.double() @ (q.double() * scales.double()[:, None]).T


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: PyTorch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median us per call (speedup over fp32), "
          "max error / max |y|\n")
    names = None
    for shape_name, (n, k) in SHAPES.items():
        weight = torch.randn(n, k) * 0.05
        copies = [candidates(weight) for _ in range(max(2, COLD_BYTES // (n * k * 4)))]
        kernels, cycle = copies[0], itertools.cycle(copies)
        names = names or list(kernels)
        print(f"| {shape_name} [{n}x{k}] | M | " + " | ".join(names) + " |")
        print("| --- | ---: |" + " ---: |" * len(names))
        for m in args.rows:
            x = torch.randn(m, k)
            expected = reference(weight, x)
            errors = {name: ((f(x).double() - expected).abs().max() / expected.abs().max()).item()
                      for name, f in kernels.items()}
            times: dict[str, list[float]] = {name: [] for name in kernels}
            with torch.inference_mode():
                for name in kernels:
                    copies[-1][name](x)
                for _, copy in zip(range(args.repeats), cycle):
                    for name, f in copy.items():
                        start = time.perf_counter()
                        f(x)
                        times[name].append(time.perf_counter() - start)
            base = statistics.median(times["fp32"])
            cells = [f"{statistics.median(t) * 1e6:.0f} ({base / statistics.median(t):.2f}x) e{errors[name]:.0e}"
                     for name, t in times.items()]
            print(f"| | {m} | " + " | ".join(cells) + " |")
        print()


if __name__ == "__main__":
    main()
