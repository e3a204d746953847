"""The numerical tolerance for each dtype: the one place every check takes its limits from.

A result passes when ``|actual - expected| <= atol + rtol * |expected|`` elementwise, where
``expected`` is the core's reference computed from the same inputs in float32/float64 and
rounded once to the dtype. The limits are about two units in the last place of each dtype at
magnitude 1: room for another accumulation order, fused multiply-adds or a fast reciprocal
square root, far too little for a semantic bug (a missing token, a wrong scale, a lost epsilon).
float32 is a bit wider than two ulps so a device's float32 matmul may accumulate in blocks; it
may not compute in a narrower type (TF32 or bf16 "float32" fails, as it should).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float
    logprob: float
    """End to end: how far a generated token's logprob may be from the reference's, and how
    close the reference's top two must be for a different greedy choice to count as a tie.
    Two to three times the largest difference a correct platform shows on the tiny model (float16 0.03,
    bfloat16 0.17 with the CPU platform); a semantic bug moves logprobs by whole units."""


TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float64: Tolerance(atol=1e-10, rtol=1e-10, logprob=1e-6),
    torch.float32: Tolerance(atol=1e-4, rtol=1e-4, logprob=1e-3),
    torch.float16: Tolerance(atol=2e-3, rtol=2e-3, logprob=8e-2),
    torch.bfloat16: Tolerance(atol=1.6e-2, rtol=1.6e-2, logprob=3.5e-1),
}


def tolerance(dtype: torch.dtype) -> Tolerance:
    """The tolerance of ``dtype``; a dtype without one is a gap in the suite, said plainly."""
    if dtype not in TOLERANCES:
        raise KeyError(f"runtime-conformance states no tolerance for {dtype}; known: {', '.join(map(str, TOLERANCES))}")
    return TOLERANCES[dtype]
