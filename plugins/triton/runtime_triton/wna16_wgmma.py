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

At 512 rows and more that kernel lost to the dense path (gate/up 281 us against bf16's 167):
each K tile's dequantized weight is stored to shared memory, read back by every warpgroup's
matrix instructions, and fenced by a second barrier, so shared memory, not the tensor cores,
bounds it. ``wna16_wgmma_weight_first_kernel`` (the ``weight_first`` option, 4-bit weights)
multiplies ``W x^T`` instead: each thread reads the packed words its first-operand registers need
(a quad of threads the same words, each taking its own pair of rows) and dequantizes them in
place, so only the activations go through shared memory and one barrier a tile remains (as
Marlin's kernels keep the weight in registers). Not yet run on a GPU: compiled for sm_90 its
instructions stay asynchronous and no instruction writes a register a pending one reads
(``tests/sm90_dots.py``).
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
def _start_split(x_ptr, q_ptr, x_bufs, q_bufs, K, rows, row_ok, cols, col_ok, x_ks, q_ks, stride_xm, stride_qk,
                 PER: gl.constexpr, BLOCK_K: gl.constexpr, SPLIT_K: gl.constexpr, STAGES: gl.constexpr):
    """The first K tile and the number of tiles of split ``program_id(2)`` (K split as
    ``_wna16_kernel``'s), with the copies of its tiles 0 .. STAGES - 3 started: each tile then
    starts one more (:func:`_advance_copies`)."""
    span = gl.cdiv(K // BLOCK_K, SPLIT_K)
    first = gl.program_id(2) * span
    tiles = gl.minimum(span, K // BLOCK_K - first)
    for tile in gl.static_range(STAGES - 2):
        if tile < tiles:
            _issue(x_ptr, q_ptr, x_bufs, q_bufs, tile, (first + tile) * BLOCK_K, rows, row_ok, cols, col_ok, x_ks,
                   q_ks, stride_xm, stride_qk, PER)
        async_copy.commit_group()
    return first, tiles


@gluon.jit
def _advance_copies(x_ptr, q_ptr, x_bufs, q_bufs, tile, first, tiles, rows, row_ok, cols, col_ok, x_ks, q_ks, stride_xm,
                    stride_qk, PER: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr, FENCE: gl.constexpr):
    """Wait for K tile ``tile``'s copies, then start those of the tile ``STAGES - 2`` ahead into the
    buffers of tile - 2: after the barrier every thread's copies of this tile have landed and every
    warpgroup is past its wait for the matrix instructions of tile - 2. ``FENCE``: the landed
    copies fenced here for the matrix instructions (the shared-memory weight's kernel fences them
    with its weight's stores)."""
    async_copy.wait_group(STAGES - 3)
    if FENCE:
        fence_async_shared()
    _barrier()
    if tile + STAGES - 2 < tiles:
        _issue(x_ptr, q_ptr, x_bufs, q_bufs, (tile + STAGES - 2) % STAGES, (first + tile + STAGES - 2) * BLOCK_K, rows,
               row_ok, cols, col_ok, x_ks, q_ks, stride_xm, stride_qk, PER)
    async_copy.commit_group()


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
    _advance_copies(x_ptr, q_ptr, x_bufs, q_bufs, tile, first, tiles, rows, row_ok, cols, col_ok, x_ks, q_ks, stride_xm,
                    stride_qk, PER, BLOCK_K, STAGES, False)

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
    first, tiles = _start_split(x_ptr, q_ptr, x_bufs, q_bufs, K, rows, row_ok, cols, col_ok, x_ks, q_ks, stride_xm,
                                stride_qk, PER, BLOCK_K, SPLIT_K, STAGES)
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


@gluon.constexpr_function
def _first_operand_pairs_layout(block_n, block_k, num_warps):
    """Registers for [BLOCK_N, BLOCK_K / 8, 4]: pair ``i`` of word ``w`` of output column ``n`` (4-bit
    rows ``8w + 2i`` and ``8w + 2i + 1``), in the thread whose first-operand registers of a
    warpgroup matrix instruction (16-bit values, two a register) hold those rows of that column:
    lanes 0-1 pick the pair, lanes 2-4 and the first register the column (a warp 16 of them, a
    warpgroup 64), later registers the word. Each thread of a quad reads the same words."""
    words = [[0, 1 << bit, 0] for bit in range((block_k // 8).bit_length() - 1)]
    return gl.DistributedLinearLayout(reg_bases=[[8, 0, 0]] + words,
                                      lane_bases=[[0, 0, 1], [0, 0, 2], [1, 0, 0], [2, 0, 0], [4, 0, 0]],
                                      warp_bases=[[16 << bit, 0, 0] for bit in range(num_warps.bit_length() - 1)],
                                      block_bases=[], shape=[block_n, block_k // 8, 4])


@gluon.jit
def _register_pair_values(halves, dtype: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr):
    """``_pair_values`` without moving a bit: each register of ``halves`` read as its two 16-bit
    values (the lower half first along K), as the matrix instructions take them. Split into two
    values and joined again (``_pair_values``), the compiler put them back together with a PRMT a
    register: 64 of a 615-instruction loop (8 x 64 x 128 tiles, compiled for sm_90). With ``pack=2``
    the two elements of the join's last dimension (one thread's, adjacent) are one 32-bit output
    register, element 0 its lower half."""
    both = gl.join(halves, halves)
    values = gl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r,r", [both], dtype=dtype.value, is_pure=True, pack=2)
    return gl.reshape(values, (BLOCK_N, BLOCK_K))


@gluon.jit
def _first_operand_tile(x_ptr, q_ptr, s_ptr, z_ptr, o_ptr, x_bufs, q_bufs, acc, pending, tile, first, tiles, rows,
                        row_ok, cols, col_ok, x_ks, q_ks, group_cols, group_ok, pair_shifts, stride_xm, stride_qk,
                        stride_sg, pair_mask, pair_base, words_layout: gl.constexpr, w_layout: gl.constexpr,
                        dtype: gl.constexpr, BITS: gl.constexpr, GROUP: gl.constexpr, LEVEL: gl.constexpr,
                        BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr, ZEROS: gl.constexpr,
                        ZERO_POINT: gl.constexpr, OFFSETS: gl.constexpr, USE_ACC: gl.constexpr):
    """K tile ``tile`` with the weight as the first operand: wait for its copies, start those of the
    tile ``STAGES - 2`` ahead, dequantize its words straight into the registers the matrix
    instructions read, and leave them running. ``pending``: the previous tile's weight registers,
    kept until this tile's wait has retired that tile's instructions. Returns the sums and this
    tile's weight registers (the caller keeps them until the next tile's wait)."""
    PER: gl.constexpr = 32 // BITS
    scale, bias, offset = _group_terms(s_ptr, z_ptr, o_ptr, (first + tile) * BLOCK_K, group_cols, group_ok,
                                       stride_sg, dtype, GROUP, LEVEL, ZEROS, ZERO_POINT, OFFSETS)
    _advance_copies(x_ptr, q_ptr, x_bufs, q_bufs, tile, first, tiles, rows, row_ok, cols, col_ok, x_ks, q_ks, stride_xm,
                    stride_qk, PER, BLOCK_K, STAGES, True)
    slot = tile % STAGES
    words = q_bufs.index(slot).permute((1, 0)).load(words_layout)
    halves = ((words[:, :, None] >> pair_shifts[None, None, :]) & pair_mask) | pair_base
    levels = gl.convert_layout(_register_pair_values(halves, dtype, BLOCK_N, BLOCK_K), w_layout)
    w = (levels - bias[:, None]) * scale[:, None]
    if OFFSETS:
        w += offset[:, None]
    acc = warpgroup_mma(w, x_bufs.index(slot).permute((1, 0)), acc, use_acc=USE_ACC, is_async=True)
    acc, pending = warpgroup_mma_wait(num_outstanding=1, deps=(acc, pending))
    return acc, w


@gluon.jit
def wna16_wgmma_weight_first_kernel(x_ptr, q_ptr, s_ptr, z_ptr, o_ptr, out_ptr, partial_ptr, ticket_ptr, M, N, K,
                                    stride_xm, stride_qk, stride_sg, stride_om, pair_mask, pair_base,
                                    BITS: gl.constexpr, GROUP: gl.constexpr, LEVEL: gl.constexpr,
                                    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
                                    SPLIT_K: gl.constexpr, STAGES: gl.constexpr, ZEROS: gl.constexpr,
                                    ZERO_POINT: gl.constexpr, OFFSETS: gl.constexpr, num_warps: gl.constexpr):
    """``(W x^T)^T`` for a [BLOCK_M, BLOCK_N] output tile, 4-bit weights: the weight is the first
    operand, dequantized into registers (a warpgroup's 64 of the BLOCK_N = 16 x num_warps columns),
    the activations the second, from shared memory; no dequantized weight goes through shared memory
    and one barrier a tile orders the activation buffers. Every split holds an even number of K
    tiles, at least 2 (the launcher checks): tiles alternate between two sets of weight registers in
    a loop unrolled twice, each set kept until the wait that retires its instructions (in a loop of
    one tile the carried set is a copy, and ptxas rewrites the registers the pending instructions
    still read: ``tests/sm90_dots.py`` walks the SASS for such writes), and the first and last tiles
    lie outside the loop (the first not adding to the zeroed sums, which keeps ptxas from
    serializing the matrix instructions)."""
    dtype: gl.constexpr = x_ptr.dtype.element_ty
    x_copy: gl.constexpr = _copy_layout(BLOCK_M, BLOCK_K, 8, num_warps)
    q_copy: gl.constexpr = _copy_layout(BLOCK_K // 8, BLOCK_N, 4, num_warps)
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                         instr_shape=[16, BLOCK_M, 16])
    w_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    pairs_layout: gl.constexpr = _first_operand_pairs_layout(BLOCK_N, BLOCK_K, num_warps)
    words_layout: gl.constexpr = gl.SliceLayout(2, pairs_layout)
    x_shared: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_K], dtype)
    x_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, BLOCK_K], x_shared)
    q_bufs = gl.allocate_shared_memory(gl.int32, [STAGES, BLOCK_K // 8, BLOCK_N], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))

    off_m = gl.program_id(0) * BLOCK_M
    off_n = gl.program_id(1) * BLOCK_N
    rows = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, x_copy))
    x_ks = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, x_copy))
    q_ks = gl.arange(0, BLOCK_K // 8, layout=gl.SliceLayout(1, q_copy))
    cols = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, q_copy))
    row_ok = rows < M
    col_ok = cols < N
    group_cols = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, w_layout))
    group_ok = group_cols < N
    pair_shifts = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, pairs_layout))) * BITS
    first, tiles = _start_split(x_ptr, q_ptr, x_bufs, q_bufs, K, rows, row_ok, cols, col_ok, x_ks, q_ks, stride_xm,
                                stride_qk, 8, BLOCK_K, SPLIT_K, STAGES)
    acc = gl.zeros((BLOCK_N, BLOCK_M), dtype=gl.float32, layout=acc_layout)
    acc, w_even = _first_operand_tile(
        x_ptr, q_ptr, s_ptr, z_ptr, o_ptr, x_bufs, q_bufs, acc, gl.full((BLOCK_N, BLOCK_K), 0.0, dtype, w_layout), 0,
        first, tiles, rows, row_ok, cols, col_ok, x_ks, q_ks, group_cols, group_ok, pair_shifts, stride_xm, stride_qk,
        stride_sg, pair_mask, pair_base, words_layout, w_layout, dtype, BITS, GROUP, LEVEL, BLOCK_N, BLOCK_K, STAGES,
        ZEROS, ZERO_POINT, OFFSETS, False)
    for tile in range(1, tiles - 1, 2):
        acc, w_odd = _first_operand_tile(
            x_ptr, q_ptr, s_ptr, z_ptr, o_ptr, x_bufs, q_bufs, acc, w_even, tile, first, tiles, rows, row_ok, cols,
            col_ok, x_ks, q_ks, group_cols, group_ok, pair_shifts, stride_xm, stride_qk, stride_sg, pair_mask,
            pair_base, words_layout, w_layout, dtype, BITS, GROUP, LEVEL, BLOCK_N, BLOCK_K, STAGES, ZEROS, ZERO_POINT,
            OFFSETS, True)
        acc, w_even = _first_operand_tile(
            x_ptr, q_ptr, s_ptr, z_ptr, o_ptr, x_bufs, q_bufs, acc, w_odd, tile + 1, first, tiles, rows, row_ok, cols,
            col_ok, x_ks, q_ks, group_cols, group_ok, pair_shifts, stride_xm, stride_qk, stride_sg, pair_mask,
            pair_base, words_layout, w_layout, dtype, BITS, GROUP, LEVEL, BLOCK_N, BLOCK_K, STAGES, ZEROS, ZERO_POINT,
            OFFSETS, True)
    acc, w_odd = _first_operand_tile(
        x_ptr, q_ptr, s_ptr, z_ptr, o_ptr, x_bufs, q_bufs, acc, w_even, tiles - 1, first, tiles, rows, row_ok, cols,
        col_ok, x_ks, q_ks, group_cols, group_ok, pair_shifts, stride_xm, stride_qk, stride_sg, pair_mask, pair_base,
        words_layout, w_layout, dtype, BITS, GROUP, LEVEL, BLOCK_N, BLOCK_K, STAGES, ZEROS, ZERO_POINT, OFFSETS, True)
    acc, w_odd = warpgroup_mma_wait(num_outstanding=0, deps=(acc, w_odd))
    async_copy.wait_group(0)

    out_cols = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, acc_layout))
    out_rows = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, acc_layout))
    _store_split(acc, out_ptr, partial_ptr, ticket_ptr + gl.program_id(0) * gl.num_programs(1) + gl.program_id(1),
                 out_rows[None, :].to(gl.int64) * stride_om + out_cols[:, None],
                 out_rows[None, :].to(gl.int64) * N + out_cols[:, None], (out_rows < M)[None, :] & (out_cols < N)[:, None],
                 gl.program_id(2), M, N, SPLIT_K)
