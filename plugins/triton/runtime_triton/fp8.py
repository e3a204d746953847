"""Dynamic per-token FP8 (e4m3) quantization of activations, for ``Fp8Method``'s scaled matmul.

One program per row reads the row once, takes its absolute maximum, and writes the row scaled
into e4m3's range with its float32 scale: one kernel instead of torch's abs, amax, div, clamp and
cast. Shapes depend on the input's shape only and nothing is read back to the host, so the
kernel is captured in CUDA graphs like any other.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# The smallest amax a scale is taken from: an all-zero row gets a tiny positive scale and zeros
# instead of a division by zero.
MIN_AMAX = 1e-12


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, n_cols, stride_x, stride_q,
                          FP8_MAX: tl.constexpr, MIN_AMAX: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), 0), MIN_AMAX) / FP8_MAX
    # x / scale can land a rounding step above FP8_MAX; e4m3fn has no infinity to absorb it.
    q = tl.clamp(x / scale, -FP8_MAX, FP8_MAX)
    tl.store(q_ptr + row * stride_q + cols, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_ptr + row, scale)


def quantize_rows(x: torch.Tensor, fp8_dtype: torch.dtype = torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` [M, K] (unit column stride) -> (``fp8_dtype`` [M, K] row-major, float32 scales [M, 1])
    with ``x ~= q * scale`` row by row, each row's absolute maximum mapped to the format's largest
    value (448 for e4m3fn; 240 for e4m3fnuz, the e4m3 of AMD's MI300)."""
    rows, cols = x.shape
    fp8_max = float(torch.finfo(fp8_dtype).max)
    q = torch.empty((rows, cols), dtype=fp8_dtype, device=x.device)
    scale = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
    if rows:
        block = triton.next_power_of_2(cols)
        _quantize_rows_kernel[(rows,)](x, q, scale, cols, x.stride(0), q.stride(0), FP8_MAX=fp8_max,
                                       MIN_AMAX=MIN_AMAX, BLOCK=block, num_warps=min(16, max(1, block // 256)))
    return q, scale
