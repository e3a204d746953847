"""Time ``skinny_matmul`` (Triton) against cuBLAS ``F.linear`` on Llama-3-8B's shapes at 1-16 rows.

Usage: python plugins/cuda/benchmarks/skinny_matmul.py --out skinny.json

For each weight (qkv 6144x4096, o 4096x4096, gate_up 28672x4096, down 4096x14336, lm_head
128256x4096) and M rows: the median time of F.linear with torch's default BLAS (cuBLAS), with
cuBLASLt preferred, and of skinny_matmul under each config of a small sweep (at M = 1 and 8; the
other M reuse the best of M = 8), as microseconds and weight-read bandwidth (TB/s), and the
largest error of each against a float64 product. do_bench flushes L2 between runs, so weights
come from HBM as they do in a model.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import torch
import torch.nn.functional as F
from triton.runtime.errors import OutOfResources
from triton.testing import do_bench

from runtime_triton.skinny_matmul import skinny_matmul

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096)}
SWEEP_ROWS = (1, 8)
OTHER_ROWS = (2, 4, 16)
CONFIGS = [dict(block_n=n, block_k=k, num_warps=w, num_stages=s)
           for n, k, w, s in itertools.product((16, 32, 64), (128, 256, 512), (4, 8), (3, 4, 6))
           if n * k <= 16384]


def bench(fn) -> float:
    return do_bench(fn, warmup=5, rep=20, return_mode="median") * 1e3


def bench_config(x: torch.Tensor, w: torch.Tensor, config: dict) -> float | None:
    """Microseconds, or None where the config needs more shared memory than the GPU has."""
    try:
        return bench(lambda: skinny_matmul(x, w, **config))
    except OutOfResources:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    start = time.perf_counter()
    results = []
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k ** -0.5
        best8 = None
        for m in SWEEP_ROWS + OTHER_ROWS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            reference = x.double() @ w.double().T
            row = {"shape": name, "n": n, "k": k, "m": m}
            torch.backends.cuda.preferred_blas_library("cublas")
            row["cublas_us"] = bench(lambda: F.linear(x, w))
            row["cublas_err"] = (F.linear(x, w).double() - reference).abs().max().item()
            torch.backends.cuda.preferred_blas_library("cublaslt")
            row["cublaslt_us"] = bench(lambda: F.linear(x, w))
            torch.backends.cuda.preferred_blas_library("cublas")
            configs = CONFIGS if m in SWEEP_ROWS else [best8]
            timed = sorted((us, i) for i, c in enumerate(configs) if (us := bench_config(x, w, c)) is not None)
            best_us, best = timed[0][0], configs[timed[0][1]]
            if m == 8:
                best8 = best
            row |= {"skinny_us": best_us, "skinny_config": best,
                    "skinny_top5": [[round(t, 2), configs[i]] for t, i in timed[:5]],
                    "skinny_err": (skinny_matmul(x, w, **best).double() - reference).abs().max().item()}
            for key in ("cublas", "cublaslt", "skinny"):
                row[f"{key}_TBps"] = round(n * k * 2 / row[f"{key}_us"] / 1e6, 3)
            row["speedup_vs_cublas"] = round(row["cublas_us"] / best_us, 3)
            print(json.dumps({key: v for key, v in row.items() if key != "skinny_top5"}), flush=True)
            results.append(row)
        del w
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "seconds": round(time.perf_counter() - start, 1), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    with open(args.out, "w") as f:
        json.dump(meta | {"results": results}, f, indent=2)


if __name__ == "__main__":
    main()
