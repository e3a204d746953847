"""Instructions a weight in the main loop of the W4A16 kernels for sm_90, on any machine.

Usage: .venv/bin/python benchmarks/wna16_sass.py [--rows 1 16 64 128] [--projection 6144x4096] [--json OUT.json]

Each plan (the op's own at each number of rows, the pairs kernel's at the same rows, at one row
the vector kernel's with ``shared_shifts``, and the weight-first Gluon kernel's: 8- or 16-row tiles
up to 16 rows, else 128 x 64 x 64) is
launched on CPU tensors with Triton's launch recorded instead of run (plugins/cuda/tests/
sm90_dots.py), compiled for sm_90 with Triton's compiler and ptxas, and disassembled with the
``nvdisasm`` of Triton's wheel. The longest loop closed by a backward branch is the K loop; its
instructions over the weights a thread dequantizes in one iteration (``block_n * block_k`` over
the threads) is the figure docs/quantization.md quotes, with the loop's most frequent opcodes. A
count, not a speed: issue bounded these kernels on an H100, so fewer instructions a weight is
what a GPU sweep then confirms or not (``benchmarks/kernels_gpu.py wna16-sweep``).
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins" / "cuda" / "tests"))

import torch  # noqa: E402
import triton  # noqa: E402
from sm90_dots import compile_for_sm90, recorded_launches  # noqa: E402

from runtime.platform.packed import GroupQuantData  # noqa: E402

NVDISASM = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
PAIRS = {1: dict(block_m=16, block_n=64, block_k=128, split_k=4, num_warps=4, num_stages=4),
         16: dict(block_m=16, block_n=64, block_k=128, split_k=8, num_warps=4, num_stages=4),
         64: dict(block_m=64, block_n=64, block_k=128, split_k=4, num_warps=4, num_stages=3),
         128: dict(block_m=128, block_n=128, block_k=128, split_k=1, num_warps=8, num_stages=3)}
"""The pairs kernel's tiles tried at each number of rows (the shapes of its first sweep's winners)."""


def loop_opcodes(cubin: bytes) -> collections.Counter:
    """Opcodes of the longest loop closed by a backward branch."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        lines = subprocess.run([str(NVDISASM), "-c", file.name], capture_output=True, text=True, check=True).stdout.splitlines()
    labels = {line.rstrip(":"): i for i, line in enumerate(lines) if line.startswith(".L_x")}
    loops = [(labels[m.group(1)], i) for i, line in enumerate(lines)
             if (m := re.search(r"BRA `\((\.L_x_\d+)\)", line)) and labels.get(m.group(1), len(lines)) < i]
    start, end = max(loops, key=lambda span: span[1] - span[0])
    return collections.Counter(m.group(2) for line in lines[start:end + 1]
                               if (m := re.search(r"\*/\s*(@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)))


def measure(n: int, k: int, rows: int, tiles: dict) -> dict:
    from runtime_triton import wna16

    data = GroupQuantData(torch.zeros(n, k, dtype=torch.uint8), torch.ones(n, k // 128), torch.full((n, k // 128), 8.0),
                          4, 128, None)
    weight = wna16.repack(data, torch.bfloat16, torch.device("cpu"))
    plan = tiles or wna16.plan(rows, n, k)
    if plan.get("dense"):
        return {"rows": rows, "plan": plan, "note": "the dense path: the library's GEMM"}
    with recorded_launches() as launches:
        wna16.matmul(weight, torch.zeros(rows, k, dtype=torch.bfloat16), **plan)
    kernel, args, kwargs = launches[0]
    opcodes = loop_opcodes(compile_for_sm90(kernel, args, kwargs).asm["cubin"])
    # The weight-first Gluon kernel's loop takes two K tiles an iteration (its two register sets).
    tiles = 2 if plan.get("wgmma") and plan.get("weight_first") else 1
    weights = tiles * plan["block_n"] * plan["block_k"] / (32 * plan["num_warps"])
    total = sum(opcodes.values())
    return {"rows": rows, "kernel": kernel.__name__, "plan": plan, "loop_instructions": total,
            "per_weight": round(total / weights, 2), "top": dict(opcodes.most_common(8))}


def main() -> None:
    from runtime_triton import wna16

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64, 128])
    parser.add_argument("--projection", default="6144x4096", help="N x K of the weight (default Llama-3-8B's qkv)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    n, k = (int(v) for v in args.projection.split("x"))
    rows_out = []
    for rows in args.rows:
        plans = [("own", None), ("pairs", {**PAIRS[min(PAIRS, key=lambda r: abs(r - rows))], "pairs": True})]
        if rows == 1:
            plans.append(("shared_shifts", {**wna16.plan(rows, n, k), "shared_shifts": True}))
        # The weight-first Gluon kernel (Hopper): 8- or 16-row tiles for few rows, else gate/up's 256-row tile.
        few = rows <= 16
        block_m = (8 if rows <= 8 else 16) if few else 128
        plans.append(("weight_first", dict(wgmma=True, weight_first=True, block_m=block_m, block_n=64,
                                           block_k=128 if few else 64, split_k=4 if few else 1, num_warps=4,
                                           num_stages=4)))
        for label, tiles in plans:
            row = {"plan_of": label, **measure(n, k, rows, tiles)}
            print(json.dumps(row), flush=True)
            rows_out.append(row)
    if args.json:
        args.json.write_text(json.dumps(rows_out, indent=1))


if __name__ == "__main__":
    main()
