"""The numerical tolerance for each dtype: the one place every check takes its limits from.

A result passes when ``|actual - expected| <= atol + rtol * |expected|`` elementwise, where
``expected`` is the core's reference computed from the same inputs in float32/float64 and
rounded once to the dtype. The limits are about two units in the last place of each dtype at
magnitude 1: room for another accumulation order, fused multiply-adds or a fast reciprocal
square root, far too little for a semantic bug (a missing token, a wrong scale, a lost epsilon).
float32 is a bit wider than two ulps so a device's float32 matmul may accumulate in blocks; it
may not compute in a narrower type (TF32 or bf16 "float32" fails, as it should).

Elementwise limits alone let a systematic fault hide under the rounding of a narrow dtype: in
bfloat16 two units in the last place absorb an activation approximated badly in its tails, a
product accumulated in bfloat16, or an epsilon lost on small rows. So each result is also held
to the error a correct implementation makes in the same dtype (see :class:`Precision`).
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


@dataclass(frozen=True)
class Precision:
    """How much larger than a correct implementation's a candidate's error may be.

    Errors are measured against the float64 result and counted in units of the dtype's epsilon
    relative to that result (or to ``floor`` times its RMS, for values near zero; see
    :func:`runtime_conformance.compare.precision`). The baseline is the core's reference run on
    the same inputs in the candidate's dtype, accumulating in float32, rounded once: what a
    correct kernel on any device makes. A candidate fails when its mean error exceeds
    ``mean_factor`` times the baseline's, or its largest error ``max_factor`` times the
    baseline's largest; a baseline below ``min_mean`` / ``min_max`` units (an exactly
    representable result) counts as that much, so a result one rounding away always passes.

    The factors leave room for what correct kernels legitimately do differently. In float16
    and bfloat16 the output rounding dominates a kernel that accumulates in float32: another
    summation order, a tensor core's blocked accumulation, flash attention's rounding of its
    probabilities to the input dtype before the second product, or RMSNorm rounding the
    normalized value before the weight add at most about one rounding, so the mean may double
    and the worst value grow a few units; 4 and 8 leave twice that. A kernel that accumulates in
    the narrow dtype, drops a scale or approximates an activation wrongly moves the mean by ten
    times or more (the project's mutation self-test measures the margins). float32 results carry
    only float32 rounding, so faster but correct device math (fast exponentials and reciprocal
    square roots, split-K reductions, blocked flash-attention softmax) may make errors many
    times the CPU reference's; 32 and 128 admit that while a TF32 or bfloat16 "float32" product,
    thousands of float32 units off, still fails by a wide margin.
    """

    mean_factor: float
    max_factor: float
    min_mean: float = 1 / 16
    """Units: a quarter of the mean error of rounding once to the dtype (results measured
    against their RMS average less than that: most values are smaller than the RMS)."""
    min_max: float = 0.5
    """Units: the largest error of rounding once to the dtype."""


PRECISION: dict[torch.dtype, Precision] = {
    torch.float32: Precision(mean_factor=32, max_factor=128),
    torch.float16: Precision(mean_factor=4, max_factor=8),
    torch.bfloat16: Precision(mean_factor=4, max_factor=8),
}

ELEMENTWISE_FLOOR = 2 ** -16
"""Elementwise ops (activations, norms, rotary) are computed value by value, so a correct
result is within a rounding of each value itself: errors count relative to the value down to
this fraction of the result's RMS, where the float32 computation of a tiny value (an activation's
far tail) stops being relative. Reductions (products, attention, LoRA, MoE) sum terms that may
cancel, so their errors count relative to the result's RMS (a floor of 1)."""

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


@dataclass(frozen=True)
class QuantizedFormat:
    unit: float
    """The largest rounding error of one value, relative to the largest magnitude of its output
    channel (``per_channel``) or to the value itself (floating-point formats)."""
    per_channel: bool


# int8: symmetric round-to-nearest over [-127, 127] * max|W_c| / 127, half a step is 1/254 of
# the channel's largest value. fp8: half the spacing of 3 (e4m3) or 2 (e5m2) mantissa bits.
QUANTIZED_FORMATS: dict[torch.dtype, QuantizedFormat] = {
    torch.int8: QuantizedFormat(unit=1 / 254, per_channel=True),
    torch.uint8: QuantizedFormat(unit=1 / 254, per_channel=True),
    torch.float8_e4m3fn: QuantizedFormat(unit=2 ** -4, per_channel=False),
    torch.float8_e5m2: QuantizedFormat(unit=2 ** -3, per_channel=False),
    # AMD MI300's FNUZ variants: the same mantissa bits, a different exponent range.
    torch.float8_e4m3fnuz: QuantizedFormat(unit=2 ** -4, per_channel=False),
    torch.float8_e5m2fnuz: QuantizedFormat(unit=2 ** -3, per_channel=False),
}


def quantized_matmul_tolerance(x: torch.Tensor, weight: torch.Tensor, stored: torch.dtype) -> torch.Tensor:
    """How far ``x @ W.T`` may move, per output element, when W (and x, which a method may
    quantize too, per row) is rounded to ``stored``: eight standard deviations of the sum of
    independent rounding errors, each uniform within the format's unit.

    Rounding W's channel c moves output (i, c) by sum_k x_ik * e_ck with |e_ck| <= unit * m_ck,
    where m_ck is the channel's largest |W| (per-channel formats) or |W_ck| (floating point);
    the sum's standard deviation is at most unit / sqrt(3) * ||x_i * m_c||. Rounding x adds the
    same with the roles swapped. A wrong scale, a transposed or shifted weight, moves outputs
    by their own size, many times this.
    """
    fmt = QUANTIZED_FORMATS[stored]
    if fmt.per_channel:
        w_bound = weight.abs().amax(dim=1, keepdim=True).expand_as(weight)
        x_bound = x.abs().amax(dim=1, keepdim=True).expand_as(x)
    else:
        w_bound, x_bound = weight.abs(), x.abs()
    spread = torch.sqrt((x ** 2) @ (w_bound ** 2).T) + torch.sqrt((x_bound ** 2) @ (weight ** 2).T)
    return 8 * fmt.unit / 3 ** 0.5 * spread
