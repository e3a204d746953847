"""A launch that lets its programmatic dependents start at once and writes its output only after
about a millisecond of arithmetic: a dependent (``runtime_triton/dependent.py``) that reads that
output before its ``gdc_wait`` reads what was there before. Only if the dependent is launched
right after it: any launch or copy in between waits for it to finish, and the check sees nothing."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc

BLOCK = 1024
SPINS = 400_000


@triton.jit
def _late_copy_kernel(src_ptr, dst_ptr, n, spins, BLOCK: tl.constexpr):
    gdc.gdc_launch_dependents()
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n
    value = tl.load(src_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    delay = value
    for _ in range(spins):
        delay = delay * 0.999 + 1e-3
    # Never NaN, but the compiler cannot know it: the loop stays.
    tl.store(dst_ptr + cols, tl.where(delay != delay, 0.0, value).to(dst_ptr.dtype.element_ty), mask=ok)


def late_copy(src: torch.Tensor, dst: torch.Tensor) -> None:
    """``dst`` (contiguous, a 16-bit or 32-bit float type) = ``src``, written late."""
    assert src.shape == dst.shape and dst.is_contiguous() and src.is_contiguous()
    _late_copy_kernel[(triton.cdiv(dst.numel(), BLOCK),)](src, dst, dst.numel(), SPINS, BLOCK=BLOCK, num_warps=4)
