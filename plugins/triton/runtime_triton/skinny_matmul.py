"""A matmul for few rows: ``x @ W.T (+ b)`` with ``x`` of at most 16 rows, bound by reading ``W``.

cuBLAS runs such products as GEMVs whose speed varies by shape: on an H100 Llama-3-8B's down
projection (4096 x 14336) reads its weight at 2.1 TB/s against 2.45 TB/s for gate/up (alone). This
kernel gives every shape the same plan: a program owns ``BLOCK_N`` output columns (weight rows),
walks the whole reduction in ``BLOCK_K`` steps, and multiplies on the tensor cores with the rows
padded to 16 (free: the tensor cores idle while the weight streams in). No split of K, so no
partial sums, no second kernel and no atomics: the result is written once, in the input dtype.

``linear`` is the platform's ``linear`` op: this kernel for up to 16 rows of a 16-bit weight
(decode batches, and CUDA graphs of up to 16 sequences), cuBLAS (hipBLASLt on ROCm) for everything
else. Tile sizes per GPU family: ``tile_plans``.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .dependent import as_dependent, wait_for_the_launch_before
from .tile_plans import nvidia

MAX_ROWS = 16


@triton.jit
def skinny_product(x_ptr, w_ptr, M, N, K, stride_xm, stride_wn, cols, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """x @ W[cols].T for the (up to 16) rows of ``x``, as float32 [16, BLOCK_N] (rows from M on are zeros)."""
    rows = tl.arange(0, 16)
    reduce = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows[:, None].to(tl.int64) * stride_xm + reduce[None, :]
    w_ptrs = w_ptr + cols[:, None].to(tl.int64) * stride_wn + reduce[None, :]
    row_ok, col_ok = rows[:, None] < M, cols[:, None] < N
    acc = tl.zeros((16, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        k_ok = reduce[None, :] < K - k
        x = tl.load(x_ptrs, mask=row_ok & k_ok, other=0.0)
        w = tl.load(w_ptrs, mask=col_ok & k_ok, other=0.0, eviction_policy="evict_first")
        acc += tl.dot(x, tl.trans(w))
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    return acc


@triton.jit
def _skinny_matmul_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
                          HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          DEPENDENT: tl.constexpr):
    """``DEPENDENT``: launched as a programmatic dependent of the launch before (``dependent.py``);
    it waits first, as the compiler's pipeline requests ``x`` with the weight's first tiles."""
    wait_for_the_launch_before(DEPENDENT)
    rows = tl.arange(0, 16)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = skinny_product(x_ptr, w_ptr, M, N, K, stride_xm, stride_wn, cols, BLOCK_N, BLOCK_K)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + rows[:, None] * stride_om + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(rows[:, None] < M) & (cols[None, :] < N))


def fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``x @ weight.T`` takes the skinny kernel: at most 16 rows of a 16-bit dtype, the
    weight's, and a row-major weight."""
    return (x.numel() <= MAX_ROWS * x.shape[-1] and x.dtype == weight.dtype and x.dtype in (torch.bfloat16, torch.float16)
            and weight.is_contiguous())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           plan: Callable[[int, int], dict] = nvidia.skinny_matmul) -> torch.Tensor:
    """The platform's ``linear`` op; ``plan`` is the GPU family's tiles for an [n, k] weight
    (``TilePlans.skinny_matmul``; ``registry.kernels`` binds it)."""
    if fits(x, weight):
        return skinny_matmul(x, weight, bias, **plan(*weight.shape))
    return F.linear(x, weight, bias)


def skinny_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                  block_n: int = 16, block_k: int = 256, num_warps: int = 4, num_stages: int = 4) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for ``x`` [..., K] with at most 16 rows, ``weight`` [N, K] contiguous."""
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    m, k = rows.shape
    n = weight.shape[0]
    if m > MAX_ROWS or weight.stride(-1) != 1 or weight.shape[1] != k:
        raise ValueError(f"skinny_matmul takes at most {MAX_ROWS} rows of [.., {weight.shape[1]}] and a row-major "
                         f"weight; got x {tuple(x.shape)}, weight {tuple(weight.shape)} strides {weight.stride()}")
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m:
        _skinny_matmul_kernel[(triton.cdiv(n, block_n),)](
            rows, weight, bias if bias is not None else weight, out, m, n, k, rows.stride(0), weight.stride(0),
            out.stride(0), HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps,
            num_stages=num_stages, **as_dependent(x.device))
    return out.view(*x.shape[:-1], n)
