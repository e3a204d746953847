"""Time ``Fp8Method.apply`` against bfloat16 ``F.linear`` on Llama-3-8B's linear shapes.

Usage: python plugins/cuda/benchmarks/fp8_linear.py --out fp8_linear.json

For each weight (qkv 6144x4096, o 4096x4096, gate_up 28672x4096, down 4096x14336) and M tokens
(1, 16, 64, 256, 2048), median times of:
  bf16      F.linear on the bfloat16 weight (cuBLAS)
  fp8       Fp8Method.apply: the activation-quantization kernel, then the row-wise scaled matmul
  act_quant the activation-quantization kernel alone
  rowwise   torch._scaled_mm alone with per-token x per-channel scales (what fp8 pays for its matmul)
  tensorwise torch._scaled_mm alone with one scale per operand (vLLM's default fp8 recipe), to
            show what the finer scales cost
and the relative error ||y - x @ W.T|| / ||x @ W.T|| of fp8 and bf16 against float32 at M = 64.
Small M is weight-bandwidth-bound (FP8 reads half the bytes), large M compute-bound (FP8 tensor
cores have twice bfloat16's throughput). Runs in well under a minute on an H100.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from runtime_triton.fp8 import quantize_rows
from runtime_cuda.quant import Fp8Method

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
TOKENS = (1, 16, 64, 256, 2048)
ERROR_TOKENS = 64


def bench(fn) -> float:
    """Median milliseconds (do_bench flushes L2 between runs, so weights come from HBM as in a model)."""
    return do_bench(fn, warmup=10, rep=40, return_mode="median")


def relative_error(y: torch.Tensor, reference: torch.Tensor) -> float:
    return ((y.float() - reference).norm() / reference.norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="write the results (JSON) here")
    args = parser.parse_args()
    if torch.cuda.get_device_capability() < (8, 9):
        raise SystemExit(f"{torch.cuda.get_device_name()} has no FP8 tensor cores (compute capability 8.9+)")
    start = time.perf_counter()
    method = Fp8Method()
    rows = []
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k ** -0.5
        stored = method.quantize(w)
        assert stored.scaled_mm
        one = torch.ones(1, device="cuda")
        for m in TOKENS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            x_q, x_scale = quantize_rows(x)
            row = {"weight": name, "N": n, "K": k, "M": m,
                   "bf16_ms": bench(lambda: F.linear(x, w)),
                   "fp8_ms": bench(lambda: method.apply(stored, x)),
                   "act_quant_ms": bench(lambda: quantize_rows(x)),
                   "rowwise_ms": bench(lambda: torch._scaled_mm(x_q, stored.weight.T, scale_a=x_scale,
                                                                scale_b=stored.scale, out_dtype=torch.bfloat16)),
                   "tensorwise_ms": bench(lambda: torch._scaled_mm(x_q, stored.weight.T, scale_a=one, scale_b=one,
                                                                   out_dtype=torch.bfloat16))}
            row["speedup"] = row["bf16_ms"] / row["fp8_ms"]
            if m == ERROR_TOKENS:
                reference = x.float() @ w.float().T
                row["fp8_rel_err"] = relative_error(method.apply(stored, x), reference)
                row["bf16_rel_err"] = relative_error(F.linear(x, w), reference)
            rows.append(row)
        del w, stored
        torch.cuda.empty_cache()
    print("| weight | M | bf16 ms | fp8 ms | speedup | act quant ms | rowwise mm ms | tensorwise mm ms |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['weight']} {r['N']}x{r['K']} | {r['M']} | {r['bf16_ms']:.4f} | {r['fp8_ms']:.4f} | "
              f"{r['speedup']:.2f} | {r['act_quant_ms']:.4f} | {r['rowwise_ms']:.4f} | {r['tensorwise_ms']:.4f} |")
    for r in rows:
        if "fp8_rel_err" in r:
            print(f"{r['weight']}: relative error at M={ERROR_TOKENS}: fp8 {r['fp8_rel_err']:.4f}, "
                  f"bf16 {r['bf16_rel_err']:.4f}")
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "seconds": round(time.perf_counter() - start, 1), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
