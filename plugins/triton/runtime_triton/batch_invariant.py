"""Batch-invariant dense projection for ``--deterministic`` (contract 1.10).

cuBLAS picks its kernel, tile and split-K by the number of rows, so a token's product depends on
how many tokens share its step. In this kernel every output element is the same sum in the same
order whatever the batch: each program owns a tile of the output and walks the whole reduction in
order, no split of K. For 16-bit types the tensor cores add the products 16 columns of K at a time
into the float32 accumulator, in order, so neither the tile's rows and columns nor the depth of
a K step changes a sum: they only decide which elements a program computes and how much it loads
at once, and they change with the row count and the weight's width (narrow tiles give a few rows
enough programs; wide ones feed the tensor cores at prefill), as long as every tile is at least
one 64-row warpgroup instruction wide. benchmarks/kernels_gpu.py's deterministic sweep found every
plan it tried bitwise equal to these at each Llama-3-8B projection and row count (H100, 2026-12-06);
plugins/cuda/tests/test_cuda_deterministic.py checks rows alone against batches of up to 1100.
float32 keeps one plan (IEEE products, no tensor-core shapes to choose). Slower than cuBLAS (no
split-K); docs/api.md#deterministic-mode gives the measured cost.

Past SOME_ROWS rows on Hopper and later (16-bit types, 16-byte aligned rows) a persistent variant
runs the same tiles: one program per multiprocessor walks the output tiles in groups of rows that
share weight columns in L2, and the tensor memory accelerator copies the tiles in (out-of-range
rows and columns read as zeros, as the masked loads do) and the results out. Only where the
operands come from changes, not one product or its order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fitting import fewer_stages_then_shallower, launch_fitting

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # a Triton before tensor descriptors: every plan runs on pointer loads
    TensorDescriptor = None

FLOAT32_TILES = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3)
FEW_ROWS, SOME_ROWS = 64, 256
"""Up to FEW_ROWS rows a product is weight-bound (narrow tiles, deep K steps: many loads in flight
per program); up to SOME_ROWS a narrow weight still needs narrower tiles than prefill to fill the GPU."""
WIDE = 6144
"""Output columns from which 64-column tiles leave enough programs at few rows."""
FEW_ROW_TILES = {True: dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4),
                 False: dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=256, num_warps=4, num_stages=4)}
SOME_ROW_NARROW_TILES = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=3)
SOME_ROW_WIDE_TILES = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)
MANY_ROW_TILES = {64: dict(BLOCK_M=64, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=4, persistent=True),
                  128: dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=3, persistent=True)}
"""Past SOME_ROWS, persistent 256-column tiles: at 300 rows 64 x 256 beat 128 x 128 at every Llama-3-8B
projection (qkv 30.8 against 64.0 us, o 26.0 against 33.4, down 84.4 against 112.0), and 128 x 256 at the
fused gate/up (140.9 against 206.4); at 2048 rows 128 x 256 beat both everywhere (qkv 132.9 against 193.3,
o 97.1 against 133.8; H100 deterministic sweep, 2026-12-06, fourth window)."""
WIDE_ROW_WAVES = 1.5
"""128-row tiles once they give every multiprocessor this many: fewer leave the last wave mostly idle
(the sweep's choice everywhere above but lm_head at 300 rows, where 128 x 256 came second: 637.9 us
against 616.6)."""
GROUP_M = 8
"""Row tiles a persistent program's tile order walks before moving to the next weight columns."""
FITTED_TILES: dict[tuple, dict] = {}
"""Plans that had to shrink to fit the GPU's shared memory (the few-row ones take up to 192 KB,
tuned on an H100's 227: an A100 has 164, sm_86 cards 100), by the plan and launch they replace.
Fewer stages or a shallower K step change no sum (above)."""


def tiles(rows: int, dtype: torch.dtype, columns: int, depth: int, multiprocessors: int) -> dict:
    """The plan for ``rows`` x (``columns`` output columns, ``depth`` reduction) on a device of
    ``multiprocessors``: the deterministic sweep's fastest (H100, Llama-3-8B projections) among plans
    that sum alike."""
    if dtype == torch.float32:
        return FLOAT32_TILES
    if rows <= FEW_ROWS:
        return FEW_ROW_TILES[columns >= WIDE]
    if rows <= SOME_ROWS:
        return SOME_ROW_NARROW_TILES if columns < WIDE else SOME_ROW_WIDE_TILES
    wide = MANY_ROW_TILES[128]
    wide_tiles = triton.cdiv(rows, wide["BLOCK_M"]) * triton.cdiv(columns, wide["BLOCK_N"])
    return wide if wide_tiles >= WIDE_ROW_WAVES * multiprocessors else MANY_ROW_TILES[64]


@triton.jit
def _matmul_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
                   HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   DOT_PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    reduce = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows[:, None].to(tl.int64) * stride_xm + reduce[None, :]
    w_ptrs = w_ptr + cols[:, None].to(tl.int64) * stride_wn + reduce[None, :]
    row_ok, col_ok = rows[:, None] < M, cols[:, None] < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        k_ok = reduce[None, :] < K - k
        x = tl.load(x_ptrs, mask=row_ok & k_ok, other=0.0)
        w = tl.load(w_ptrs, mask=col_ok & k_ok, other=0.0)
        acc += tl.dot(x, tl.trans(w), input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok & (cols[None, :] < N))


@triton.jit
def _persistent_matmul_kernel(x_desc, w_desc, out_desc, bias_ptr, M, N, K, programs, HAS_BIAS: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                              GROUP: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """_matmul_kernel's tiles, ``programs`` programs each taking every programs-th output tile; the
    tiles are numbered GROUP row tiles at a time per column tile, so programs running together
    read the same weight columns."""
    row_tiles = tl.cdiv(M, BLOCK_M)
    col_tiles = tl.cdiv(N, BLOCK_N)
    per_group = GROUP * col_tiles
    for tile in tl.range(tl.program_id(0), row_tiles * col_tiles, programs, flatten=True):
        first_row_tile = tile // per_group * GROUP
        group_rows = min(row_tiles - first_row_tile, GROUP)
        row_tile = first_row_tile + tile % per_group % group_rows
        col_tile = tile % per_group // group_rows
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            x = x_desc.load([row_tile * BLOCK_M, k * BLOCK_K])
            w = w_desc.load([col_tile * BLOCK_N, k * BLOCK_K])
            acc += tl.dot(x, tl.trans(w), input_precision=DOT_PRECISION)
        if HAS_BIAS:
            cols = col_tile * BLOCK_N + tl.arange(0, BLOCK_N)
            acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        out_desc.store([row_tile * BLOCK_M, col_tile * BLOCK_N], acc.to(out_desc.dtype))


def _tensor_memory_accelerator(*tensors: torch.Tensor) -> bool:
    """Whether the persistent variant can take these 2-D operands: a GPU with the tensor memory
    accelerator (sm_90 on) and rows the copy engine can address (16-byte aligned)."""
    t = tensors[0]
    return (TensorDescriptor is not None and t.is_cuda and torch.cuda.get_device_capability(t.device)[0] >= 9
            and all(u.stride(-1) == 1 and u.data_ptr() % 16 == 0 and u.stride(0) * u.element_size() % 16 == 0
                    for u in tensors))


_MULTIPROCESSORS: dict[torch.device, int] = {}


def multiprocessors(device: torch.device) -> int:
    """The device's multiprocessors (the persistent variant's program count); 1 off the GPU, where
    Triton's interpreter runs one program at a time."""
    if device.type != "cuda":
        return 1
    if device not in _MULTIPROCESSORS:
        _MULTIPROCESSORS[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _MULTIPROCESSORS[device]


def launch_persistent(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor,
                      tiling: dict, programs: int) -> None:
    """out = rows @ weight.T (+ bias) by the persistent variant, ``tiling`` (tiles, warps, stages)
    over at most ``programs`` programs."""
    (m, k), n = rows.shape, weight.shape[0]
    block_m, block_n, block_k = tiling["BLOCK_M"], tiling["BLOCK_N"], tiling["BLOCK_K"]
    programs = min(programs, triton.cdiv(m, block_m) * triton.cdiv(n, block_n))
    _persistent_matmul_kernel[(programs,)](
        TensorDescriptor.from_tensor(rows, [block_m, block_k]), TensorDescriptor.from_tensor(weight, [block_n, block_k]),
        TensorDescriptor.from_tensor(out, [block_m, block_n]), bias if bias is not None else weight, m, n, k, programs,
        HAS_BIAS=bias is not None, GROUP=GROUP_M,
        DOT_PRECISION="ieee" if rows.dtype == torch.float32 else "tf32", **tiling)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           plan: dict | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` with each row's result independent of the other rows.
    ``plan`` (tiles, warps, stages, and ``BLOCK_K``) replaces :func:`tiles`' choice: for sweeps,
    which must check that a plan sums in the same order (benchmarks/kernels_gpu.py)."""
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    m, k = rows.shape
    n = weight.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m:
        def launch(plan: dict) -> None:
            tiling = {key: value for key, value in plan.items() if key != "persistent"}
            if plan.get("persistent") and _tensor_memory_accelerator(rows, weight, out):
                launch_persistent(rows, weight, bias, out, tiling, multiprocessors(x.device))
                return
            _matmul_kernel[(triton.cdiv(m, plan["BLOCK_M"]), triton.cdiv(n, plan["BLOCK_N"]))](
                rows, weight, bias if bias is not None else weight, out, m, n, k, rows.stride(0), weight.stride(0),
                # float32 must not silently become TF32 in the matrix units.
                out.stride(0), HAS_BIAS=bias is not None, DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
                **tiling)

        plan = plan or tiles(m, x.dtype, n, k, multiprocessors(x.device))
        launch_fitting(FITTED_TILES, (tuple(sorted(plan.items())), n, k, x.dtype, x.device), plan, launch,
                       fewer_stages_then_shallower("BLOCK_K", 16))
    return out.view(*x.shape[:-1], n)
