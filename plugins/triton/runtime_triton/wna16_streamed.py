"""W4A16 for a few rows on the vector units, the packed weight streamed through shared memory
(Gluon, sm_80 and later).

``wna16._wna16_gemv_kernel`` holds one K tile's words in flight a thread: Triton pipelines only
loads that feed ``tl.dot``, so each tile's loads wait out the memory's latency before its
arithmetic, and at one row the kernel read the weight at about half the H100's bandwidth (2.18 ms
of a 3.26 ms decode step, 2026-12-07). Here each thread starts asynchronous copies of its own
words ``STAGES - 1`` tiles ahead into shared memory and reads back only what it copied (so no
barrier), while the arithmetic is the vector kernel's (``zero_from_sums``, ``shared_shifts``).
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import async_copy

from .wna16 import _biased_level, _group_terms, _shared_shift_products, _store_split


@gluon.constexpr_function
def _word_layout(words, block_n, num_warps):
    """A [WORDS, BLOCK_N] tile of words as Triton lays out the vector kernel's: 8 consecutive
    columns a thread (two 16-byte copies; few word rows a thread, so few reads of ``x``), warps
    down the word rows."""
    return gl.BlockedLayout([1, 8], [32 // (block_n // 8), block_n // 8], [num_warps, 1], [1, 0])


@gluon.jit
def _copy_tile(q_ptr, q_bufs, slot, k0, end, word, cols, col_ok, stride_qk, PER: gl.constexpr):
    """Start the copy of the words of the K tile from row ``k0`` (none past ``end``) into ``slot``."""
    word_rows = k0 // PER + word
    async_copy.async_copy_global_to_shared(
        q_bufs.index(slot), q_ptr + word_rows[:, None].to(gl.int64) * stride_qk + cols[None, :],
        mask=(word_rows < end // PER)[:, None] & col_ok[None, :], eviction_policy="evict_first")


@gluon.jit
def wna16_streamed_kernel(x_ptr, q_ptr, s_ptr, z_ptr, o_ptr, out_ptr, partial_ptr, ticket_ptr, M, N, K, stride_xm,
                          stride_qk, stride_sg, stride_om, level_mask, level_base, BITS: gl.constexpr,
                          GROUP: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, SPLIT_K: gl.constexpr,
                          STAGES: gl.constexpr, ZEROS: gl.constexpr, ZERO_POINT: gl.constexpr, OFFSETS: gl.constexpr,
                          SHARED_SHIFTS: gl.constexpr, num_warps: gl.constexpr):
    """One row of ``x`` a program (``_wna16_gemv_kernel``'s grid and split), levels biased by
    ``2**BITS`` and the zero point taken off from the row's sums (``zero_from_sums``), or two rows'
    levels a shift (``SHARED_SHIFTS``: bfloat16, 4 bits)."""
    PER: gl.constexpr = 32 // BITS
    WORDS: gl.constexpr = BLOCK_K // PER
    layout: gl.constexpr = _word_layout(WORDS, BLOCK_N, num_warps)
    q_bufs = gl.allocate_shared_memory(gl.int32, [STAGES, WORDS, BLOCK_N], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
    row, tile, split = gl.program_id(0), gl.program_id(1), gl.program_id(2)
    cols = tile * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, layout))
    col_ok = cols < N
    word = gl.arange(0, WORDS, layout=gl.SliceLayout(1, layout))
    span = gl.cdiv(gl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    start = split * span
    end = gl.minimum(start + span, K)
    x_row = x_ptr + row.to(gl.int64) * stride_xm

    for ahead in gl.static_range(STAGES - 1):
        _copy_tile(q_ptr, q_bufs, ahead, start + ahead * BLOCK_K, end, word, cols, col_ok, stride_qk, PER)
        async_copy.commit_group()
    acc = gl.zeros((WORDS, BLOCK_N), dtype=gl.float32, layout=layout)
    tiles = gl.cdiv(end - start, BLOCK_K)
    for index in range(tiles):
        k0 = start + index * BLOCK_K
        # This thread's copies of this tile have landed; it reads back only what it copied, so the
        # buffer read one tile ago (by this thread alone) takes the next copy without a barrier.
        async_copy.wait_group(STAGES - 2)
        packed = q_bufs.index(index % STAGES).load(layout)
        _copy_tile(q_ptr, q_bufs, (index + STAGES - 1) % STAGES, k0 + (STAGES - 1) * BLOCK_K, end, word, cols,
                   col_ok, stride_qk, PER)
        async_copy.commit_group()

        word_rows = k0 // PER + word
        word_ok = word_rows < end // PER
        if GROUP % BLOCK_K == 0:
            group = ((k0 // GROUP) * stride_sg + cols.to(gl.int64))[None, :]
            group_ok = col_ok[None, :]
        else:
            group = (word_rows * PER // GROUP)[:, None].to(gl.int64) * stride_sg + cols[None, :]
            group_ok = word_ok[:, None] & col_ok[None, :]
        scale, zero, offset = _group_terms(s_ptr, z_ptr, o_ptr, group, group_ok, ZEROS, ZERO_POINT, OFFSETS)
        if SHARED_SHIFTS:
            products, x_sums = _shared_shift_products(x_row, k0, word, word_ok, packed, zero, level_mask, level_base)
            acc += products * scale
        else:
            high = packed >> 16
            products = gl.zeros((WORDS, BLOCK_N), dtype=gl.float32, layout=layout)
            x_sums = gl.zeros((WORDS, ), dtype=gl.float32, layout=gl.SliceLayout(1, layout))
            for j in gl.static_range(PER):
                x = gl.load(x_row + k0 + word * PER + j, mask=word_ok, other=0.0).to(gl.float32)
                x_sums += x
                products += x[:, None] * _biased_level(packed, high, level_mask, level_base, j, BITS)
            acc += (products - (zero + (1 << BITS)) * x_sums[:, None]) * scale
        if OFFSETS:
            acc += offset * x_sums[:, None]
    async_copy.wait_group(0)
    _store_split(gl.sum(acc, 0), out_ptr, partial_ptr, ticket_ptr + row * gl.num_programs(1) + tile,
                 row.to(gl.int64) * stride_om + cols, row.to(gl.int64) * N + cols, col_ok, split, M, N, SPLIT_K)
