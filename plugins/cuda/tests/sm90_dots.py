"""The W4A16 kernels compiled for sm_90 on any machine (Triton's compiler and ptxas, no GPU): for
each tile plan given as JSON on stdin, whether a matrix instruction takes its first operand from
registers while Triton lets it run on past the next loop iteration (a wait that leaves it pending).
Triton 3.6 and 3.7 keep only the accumulator and the shared-memory operand alive across such a
wait, so the next K tile's values may be written into registers a matrix instruction still reads:
on an H100 4 of 24 such plans of the pairs kernel summed wrongly (docs/quantization.md).

Usage: echo '[{"kernel": "tile", ...plan}, ...]' | python3 sm90_dots.py   (prints a JSON list, one
``{"register_operand": bool, "pending_waits": [int, ...]}`` a plan). Run it without TRITON_INTERPRET."""

from __future__ import annotations

import json
import re
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from runtime_triton import wna16

COMMON = {"x_ptr": "*bf16", "q_ptr": "*i32", "s_ptr": "*bf16", "z_ptr": "*bf16", "o_ptr": "*bf16", "out_ptr": "*bf16",
          "partial_ptr": "*fp32", "ticket_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32",
          "stride_qk": "i32", "stride_sg": "i32", "stride_om": "i32"}
ALIGNED = {"N", "K", "stride_xm", "stride_qk", "stride_sg", "stride_om"}
"""What the launcher specializes as multiples of 16 for the Llama-shaped products (and every pointer)."""


def compile_plan(plan: dict):
    group = dict(BITS=4, GROUP=128, ZEROS=False, ZERO_POINT=8, OFFSETS=False)
    tiles = dict(BLOCK_M=plan["block_m"], BLOCK_N=plan["block_n"], BLOCK_K=plan["block_k"], SPLIT_K=plan["split_k"])
    if plan["kernel"] == "pairs":
        kernel, signature = wna16._wna16_pairs_kernel, {**COMMON, "pair_mask": "i32", "pair_base": "i32"}
        constants = {**group, "LEVEL": 128.0, **tiles}
    else:
        kernel, signature = wna16._wna16_kernel, dict(COMMON)
        constants = {**group, **tiles, "IEEE": False, "WORDS_ONCE": plan.get("words_once", False),
                     "SWAP_AB": plan.get("swap_ab", False)}
    signature.update(dict.fromkeys(constants, "constexpr"))
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(signature)
             if name.endswith("_ptr") or name in ALIGNED}
    return triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=plan["num_warps"], num_stages=plan["num_stages"]))


def inspect(plan: dict) -> dict:
    ttgir = compile_plan(plan).asm["ttgir"]
    first_operands = re.findall(r"ttng\.warp_group_dot %\S+, %\S+, %\S+ \{[^}]*\} : (\S+)", ttgir)
    return {"register_operand": any(operand.startswith("tensor<") for operand in first_operands),
            "pending_waits": [int(n) for n in re.findall(r"ttng\.warp_group_dot_wait[^{]*\{pendings = (\d+)", ttgir)]}


if __name__ == "__main__":
    print(json.dumps([inspect(plan) for plan in json.load(sys.stdin)]))
