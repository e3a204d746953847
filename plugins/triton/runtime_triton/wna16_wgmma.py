"""W4A16 for many rows on Hopper: each K tile of the weight dequantized while the matrix
instructions of the tile before it run (Gluon, sm_90).

Triton's ``tl.dot`` waits for a tile's matrix instructions before the next tile's dequantized
weight may be stored for them (one shared-memory buffer) or, with the weight from registers,
lets them run on while the next tile's registers are written (the race ``wna16.py`` describes):
either way the vector units that dequantize and the tensor cores that multiply take turns, and the
pairs kernel reached about half the library's bf16 GEMM at 256-512 rows, where the op then
dequantized the whole weight and called that GEMM (H100, 2026-12-07). Here the shared memory is
laid out by hand: activation and packed-weight tiles arrive by asynchronous copies ``STAGES - 2``
tiles ahead, the dequantized weight alternates between two buffers, and each K tile's matrix
instructions are left running (``warpgroup_mma_wait(1)``) while the next tile is dequantized.
On an H100 a layer's projections took 121 us at 64 rows (the pairs plans and bf16 157), 178 at 128
(281; bf16 170) and 325 at 256 (390; bf16 196); at 512 rows the dense path stays ahead
(docs/quantization.md, twenty-fourth session). Those figures are of the first form, in which ptxas
serializes the matrix instructions of some tiles (128 x 128 x 64 among them: each waited for in
full); ``OVERLAP`` keeps them asynchronous in every tile (``plugins/cuda/tests/sm90_dots.py``
checks the SASS), which ``wna16.plan`` picks: with it and retuned tiles 117, 176 and 318 us at 64,
128 and 256 rows (H100, twenty-fifth session; the asynchronous instructions alone gained 0-4%).

Dequantization is the pairs kernel's (``wna16._wna16_pairs_kernel``): a shift and a mask put a
pair of rows' levels into a register's 16-bit halves, or-ed into ``LEVEL``'s bits, then one packed
subtraction of ``LEVEL + zero`` and one packed multiplication by the group's scale. K tiles lie
inside one group; the weight's rows (the output's columns) are the second operand, read from
shared memory transposed.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (async_copy, fence_async_shared, warpgroup_mma,
                                                              warpgroup_mma_wait)

from .wna16 import _pair_levels, _store_split

# A barrier of the CTA's threads: ``thread_barrier`` in Triton 3.6, ``barrier`` from 3.7.
_barrier = getattr(gl, "barrier", None) or gl.thread_barrier


@gluon.constexpr_function
def _packed_layout(block_n, block_k, per, num_warps):
    """Registers for a [BLOCK_N, BLOCK_K / PER] tile of words: a thread holds one output column's
    words along K (the dequantized values then lie contiguous along K, as the weight's buffer
    keeps them), a warp 32 consecutive columns (conflict-free reads of the N-contiguous copy)."""
    words = block_k // per
    along_k = max(1, num_warps * 32 // block_n)
    return gl.BlockedLayout([1, words // along_k], [32, 1], [num_warps // along_k, along_k], [0, 1])


@gluon.constexpr_function
def _copy_layout(rows, cols, vector, num_warps):
    """Registers for an asynchronous copy of a [rows, cols] tile, ``vector`` contiguous elements a
    thread along the last dimension (16-byte copies)."""
    across = min(32, cols // vector)
    # Warps along the rows while there are rows for them, then along the columns: no thread copies
    # an element another thread copies.
    down = max(1, min(num_warps, rows // (32 // across)))
    return gl.BlockedLayout([1, vector], [32 // across, across], [down, num_warps // down], [1, 0])


@gluon.constexpr_function
def _accumulator_layout(block_n, num_warps):
    """Warpgroups stacked along M (each its own rows of the activations, all of the weight tile)."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, block_n, 16])


@gluon.jit
def _issue(x_ptr, q_ptr, x_bufs, q_bufs, slot, k0, rows, row_ok, cols, col_ok, x_ks, q_ks, stride_xm, stride_qk,
           PER: gl.constexpr):
    """Start the copies of the K tile at row ``k0``: its activations and packed words, into buffer ``slot``."""
    async_copy.async_copy_global_to_shared(
        x_bufs.index(slot), x_ptr + rows[:, None].to(gl.int64) * stride_xm + (k0 + x_ks)[None, :],
        mask=row_ok[:, None])
    async_copy.async_copy_global_to_shared(
        q_bufs.index(slot), q_ptr + (k0 // PER + q_ks)[:, None].to(gl.int64) * stride_qk + cols[None, :],
        mask=col_ok[None, :], eviction_policy="evict_first")


@gluon.jit
def _group_terms(s_ptr, z_ptr, o_ptr, k0, cols, ok, stride_sg, dtype: gl.constexpr, GROUP: gl.constexpr,
                 LEVEL: gl.constexpr, ZEROS: gl.constexpr, ZERO_POINT: gl.constexpr, OFFSETS: gl.constexpr):
    """The scale, ``LEVEL + zero`` and offset (zero without ``OFFSETS``) of the group holding row ``k0``."""
    group = (k0 // GROUP) * stride_sg + cols.to(gl.int64)
    scale = gl.load(s_ptr + group, mask=ok, other=0.0).to(dtype)
    if ZEROS:
        bias = (gl.load(z_ptr + group, mask=ok, other=0).to(gl.float32) + LEVEL).to(dtype)
    else:
        bias = gl.full(cols.shape, ZERO_POINT + LEVEL, dtype, layout=cols.type.layout)
    if OFFSETS:
        offset = gl.load(o_ptr + group, mask=ok, other=0.0).to(dtype)
    else:
        offset = gl.full(cols.shape, 0.0, dtype, layout=cols.type.layout)
    return scale, bias, offset


@gluon.jit
def _tile(x_ptr, q_ptr, s_ptr, z_ptr, o_ptr, x_bufs, q_bufs, w_bufs, acc, terms, tile, first, tiles, rows, row_ok, cols,
          col_ok, x_ks, q_ks, group_cols, group_ok, stride_xm, stride_qk, stride_sg, pair_mask, pair_base,
          packed_layout: gl.constexpr, dtype: gl.constexpr, BITS: gl.constexpr, GROUP: gl.constexpr,
          LEVEL: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr,
          ZEROS: gl.constexpr, ZERO_POINT: gl.constexpr, OFFSETS: gl.constexpr, USE_ACC: gl.constexpr):
    """K tile ``tile`` of the split from tile ``first``: wait for its copies, start those of the tile
    ``STAGES - 2`` ahead, dequantize it with ``terms`` (its group's scale, ``LEVEL + zero`` and
    offset) into a weight buffer, and leave its matrix instructions running (adding to ``acc``
    where ``USE_ACC``). Returns the sums and the next tile's group terms."""
    PER: gl.constexpr = 32 // BITS
    scale, bias, offset = terms
    ahead = first + gl.minimum(tile + 1, tiles - 1)
    terms = _group_terms(s_ptr, z_ptr, o_ptr, ahead * BLOCK_K, group_cols, group_ok, stride_sg, dtype, GROUP, LEVEL,
                         ZEROS, ZERO_POINT, OFFSETS)
    async_copy.wait_group(STAGES - 3)
    # Every thread's copies of this tile have landed, and every warpgroup is past its wait for
    # the matrix instructions of tile - 2 (whose buffers are written next).
    _barrier()
    if tile + STAGES - 2 < tiles:
        _issue(x_ptr, q_ptr, x_bufs, q_bufs, (tile + STAGES - 2) % STAGES, (first + tile + STAGES - 2) * BLOCK_K, rows,
               row_ok, cols, col_ok, x_ks, q_ks, stride_xm, stride_qk, PER)
    async_copy.commit_group()

    slot = tile % STAGES
    packed = q_bufs.index(slot).permute((1, 0)).load(packed_layout)
    levels = _pair_levels(packed, pair_mask, pair_base, dtype, BITS, BLOCK_N, BLOCK_K)
    level_layout: gl.constexpr = gl.SliceLayout(1, levels.type.layout)
    w = (levels - gl.convert_layout(bias, level_layout)[:, None]) * gl.convert_layout(scale, level_layout)[:, None]
    if OFFSETS:
        w += gl.convert_layout(offset, level_layout)[:, None]

    w_buf = w_bufs.index(tile % 2)
    w_buf.store(w)
    # The matrix instructions read shared memory through the async proxy: fence this thread's
    # writes (and its landed copies), then wait for every thread's.
    fence_async_shared()
    _barrier()
    acc = warpgroup_mma(x_bufs.index(slot), w_buf.permute((1, 0)), acc, use_acc=USE_ACC, is_async=True)
    return warpgroup_mma_wait(num_outstanding=1, deps=(acc, )), terms


@gluon.jit
def wna16_wgmma_kernel(x_ptr, q_ptr, s_ptr, z_ptr, o_ptr, out_ptr, partial_ptr, ticket_ptr, M, N, K, stride_xm,
                       stride_qk, stride_sg, stride_om, pair_mask, pair_base, BITS: gl.constexpr, GROUP: gl.constexpr,
                       LEVEL: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
                       SPLIT_K: gl.constexpr, STAGES: gl.constexpr, ZEROS: gl.constexpr, ZERO_POINT: gl.constexpr,
                       OFFSETS: gl.constexpr, OVERLAP: gl.constexpr, num_warps: gl.constexpr):
    """``x W^T`` for a [BLOCK_M, BLOCK_N] output tile over split ``program_id(2)``'s K tiles (K a
    whole number of BLOCK_K tiles, split as ``_wna16_kernel``'s). ``OVERLAP``: the first tile
    apart, so that ptxas keeps the matrix instructions asynchronous (every split must then have a
    tile). Without it ptxas serializes them in some tiles: the dequantization then overlaps only
    across the programs a multiprocessor holds."""
    PER: gl.constexpr = 32 // BITS
    dtype: gl.constexpr = x_ptr.dtype.element_ty
    x_copy: gl.constexpr = _copy_layout(BLOCK_M, BLOCK_K, 8, num_warps)
    q_copy: gl.constexpr = _copy_layout(BLOCK_K // PER, BLOCK_N, 4, num_warps)
    packed_layout: gl.constexpr = _packed_layout(BLOCK_N, BLOCK_K, PER, num_warps)
    acc_layout: gl.constexpr = _accumulator_layout(BLOCK_N, num_warps)
    x_shared: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_K], dtype)
    w_shared: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_K], dtype)
    q_shared: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
    x_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, BLOCK_K], x_shared)
    q_bufs = gl.allocate_shared_memory(gl.int32, [STAGES, BLOCK_K // PER, BLOCK_N], q_shared)
    w_bufs = gl.allocate_shared_memory(dtype, [2, BLOCK_N, BLOCK_K], w_shared)

    off_m = gl.program_id(0) * BLOCK_M
    off_n = gl.program_id(1) * BLOCK_N
    rows = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, x_copy))
    x_ks = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, x_copy))
    q_ks = gl.arange(0, BLOCK_K // PER, layout=gl.SliceLayout(1, q_copy))
    cols = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, q_copy))
    row_ok = rows < M
    col_ok = cols < N
    group_cols = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, packed_layout))
    group_ok = group_cols < N
    span = gl.cdiv(K // BLOCK_K, SPLIT_K)
    first = gl.program_id(2) * span
    tiles = gl.minimum(span, K // BLOCK_K - first)

    # Tiles 0 .. STAGES - 3 in flight; each iteration starts one more, into the buffer whose matrix
    # instructions (two tiles back) every warpgroup has waited for by then.
    for tile in gl.static_range(STAGES - 2):
        if tile < tiles:
            _issue(x_ptr, q_ptr, x_bufs, q_bufs, tile, (first + tile) * BLOCK_K, rows, row_ok, cols, col_ok, x_ks,
                   q_ks, stride_xm, stride_qk, PER)
        async_copy.commit_group()
    # Each tile's group terms are read a tile ahead (their latency hidden behind a tile's work).
    terms = _group_terms(s_ptr, z_ptr, o_ptr, first * BLOCK_K, group_cols, group_ok, stride_sg, dtype, GROUP, LEVEL,
                         ZEROS, ZERO_POINT, OFFSETS)
    acc = gl.zeros((BLOCK_M, BLOCK_N), dtype=gl.float32, layout=acc_layout)
    if OVERLAP:
        # The first tile outside the loop, its instructions not adding to the zeroed sums: with the
        # zeroing's moves reaching the loop, ptxas serializes every matrix instruction (C7515: "non
        # wgmma instructions defining accumulator registers ... between start and end of the
        # pipeline stage"), each waited for in full. Hence also no split without a tile (the
        # launcher splits K no finer than its tiles): a guard around this call would bring it back.
        acc, terms = _tile(x_ptr, q_ptr, s_ptr, z_ptr, o_ptr, x_bufs, q_bufs, w_bufs, acc, terms, 0, first, tiles,
                           rows, row_ok, cols, col_ok, x_ks, q_ks, group_cols, group_ok, stride_xm, stride_qk, stride_sg,
                           pair_mask, pair_base, packed_layout, dtype, BITS, GROUP, LEVEL, BLOCK_N, BLOCK_K, STAGES,
                           ZEROS, ZERO_POINT, OFFSETS, False)
    for tile in range(1 if OVERLAP else 0, tiles):
        acc, terms = _tile(x_ptr, q_ptr, s_ptr, z_ptr, o_ptr, x_bufs, q_bufs, w_bufs, acc, terms, tile, first, tiles,
                           rows, row_ok, cols, col_ok, x_ks, q_ks, group_cols, group_ok, stride_xm, stride_qk, stride_sg,
                           pair_mask, pair_base, packed_layout, dtype, BITS, GROUP, LEVEL, BLOCK_N, BLOCK_K, STAGES,
                           ZEROS, ZERO_POINT, OFFSETS, True)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
    async_copy.wait_group(0)

    out_rows = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, acc_layout))
    out_cols = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, acc_layout))
    _store_split(acc, out_ptr, partial_ptr, ticket_ptr + gl.program_id(0) * gl.num_programs(1) + gl.program_id(1),
                 out_rows[:, None].to(gl.int64) * stride_om + out_cols[None, :],
                 out_rows[:, None].to(gl.int64) * N + out_cols[None, :], (out_rows < M)[:, None] & (out_cols < N)[None, :],
                 gl.program_id(2), M, N, SPLIT_K)
