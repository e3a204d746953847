"""W4A16 / W8A16: ``x @ W.T (+ b)`` with ``W`` kept as 4- or 8-bit integers, a scale and a zero
point per group of input columns, activations in the model's 16-bit (or 32-bit) float type.

One layout serves GPTQ, AWQ and compressed-tensors (repacked at load from their unpacked form,
``runtime.platform.packed.GroupQuantData``): ``qweight`` int32 [K * bits / 32, N] holds
``32 / bits`` consecutive input rows of one output column per word, in pairs: rows ``2i`` and
``2i + 1`` of a word at bits ``i * bits`` and ``16 + i * bits`` (:func:`_shift`), so one shift and
one mask put a pair of rows into the two 16-bit halves of a register, as the tensor cores take
them (``pairs``); a tile of the weight is a run of whole words along N, read coalesced; ``scales`` are [G, N]
in the model's dtype, ``zeros`` [G, N] int16 (zero points are small integers), so the weight keeps
about the checkpoint's bytes.
Act-order checkpoints are repacked with their input rows sorted by group, and ``apply`` gathers
the activations' columns in the same order, so groups are always runs of ``group_size`` rows.

The kernel dequantizes a [BLOCK_K, BLOCK_N] tile in registers, ``(q - zero) * scale`` rounded
to the activations' dtype, and multiplies it on the tensor cores. For few rows (decode) the
reduction is split over ``split_k`` programs per output tile (so skinny products still fill the
GPU), each storing its float32 partial sums; the last to arrive adds them and writes the output.
Prefill tiles use no split. Every launch has a shape fixed by the input's, so decode steps
capture in CUDA graphs. A plan may also read each packed word once (``words_once``), multiply a row
at a time on the vector units instead of the tensor cores (``gemv``: its own kernel, which adds
the split's partial sums itself; ``prefetch``: it requests each K tile one tile ahead;
``zero_from_sums``: it multiplies ``2**bits + q`` and takes the zero point off once a word row), for
many rows dequantize two values a register in the activations' 16-bit type (``pairs``: its own
kernel; ``wgmma``: the same dequantization in a Gluon kernel for Hopper that dequantizes each K tile
while the tensor cores multiply the one before, ``wna16_wgmma.py``; with ``weight_first`` 4-bit
weights dequantized into the registers its matrix instructions read), or dequantize the whole weight
once and hand the product to the library GEMM (``dense``);
``benchmarks/kernels_gpu.py wna16-sweep`` times them against each other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from runtime.platform.packed import GroupQuantData

from .dependent import as_dependent, wait_for_the_launch_before
from .fitting import fewer_stages_then_shallower, launch_fitting
from .tickets import tickets


@dataclass
class WNA16Weight:
    """``W[n, k] = (q - zero) * scale (+ offset)``, per group of ``group_size`` input rows."""

    qweight: torch.Tensor
    """int32 [K * bits / 32, N]."""
    scales: torch.Tensor
    """[K / group_size, N] in the model's dtype."""
    zeros: torch.Tensor | None
    """[K / group_size, N] int16; None: every group's zero point is ``zero_point``."""
    bits: int
    group_size: int
    order: torch.Tensor | None = None
    """int32 [K]: input column order the rows were repacked in (act-order); None: as stored."""
    zero_point: int = 0
    """The zero point of every group where ``zeros`` is None (symmetric GPTQ, GGUF's types)."""
    offsets: torch.Tensor | None = None
    """[K / group_size, N] in the model's dtype, added after scaling (GGUF's minimums); None: none."""

    def group_arguments(self) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """The zero-point and offset pointers the kernels take (the scales stand in for an absent
        one: never read) and the constants that say which are read."""
        return (self.scales if self.zeros is None else self.zeros, self.scales if self.offsets is None else self.offsets,
                dict(ZEROS=self.zeros is not None, ZERO_POINT=self.zero_point, OFFSETS=self.offsets is not None))


def supports(data: GroupQuantData) -> bool:
    """4 or 8 bits, K a whole number of words, integer zero points, and (act-order) groups of equal size.
    (GGUF's minimums are offsets, not zero points: their zero points are integers.)"""
    k = data.qweight.shape[1]
    if data.bits not in (4, 8) or k % (32 // data.bits) or k % data.group_size:
        return False
    if not bool((data.zeros == data.zeros.round()).all()) or data.zeros.abs().max() > 2 ** 15 - 1:
        return False
    if data.g_idx is None:
        return True
    counts = torch.bincount(data.g_idx.long(), minlength=k // data.group_size)
    return len(counts) == k // data.group_size and bool((counts == data.group_size).all())


def repack(data: GroupQuantData, dtype: torch.dtype, device: torch.device) -> WNA16Weight:
    """The kernel's layout of a weight ``supports`` accepts."""
    q, order = data.qweight, None
    # A g_idx already in group order (as many checkpoints store even without act-order) needs no gather.
    if data.g_idx is not None and not bool((data.g_idx[1:] >= data.g_idx[:-1]).all()):
        order = torch.argsort(data.g_idx.long(), stable=True).to(torch.int32)
        q = q[:, order]
    per = 32 // data.bits
    values = q.T.to(torch.int64).reshape(q.shape[1] // per, per, q.shape[0])
    rows = torch.arange(per, dtype=torch.int64)
    shifts = (rows // 2 * data.bits + rows % 2 * 16)[None, :, None]
    words = (values << shifts).sum(dim=1)  # disjoint bit fields: the sum is their bitwise or
    qweight = (words - (words >= 2 ** 31).to(torch.int64) * 2 ** 32).to(torch.int32)
    # One zero point for every group (symmetric schemes, GGUF) is a constant of the kernel: no
    # zero point to read a group, no bytes to keep.
    zero_point = int(data.zeros.flatten()[0])
    uniform = bool((data.zeros == zero_point).all())
    zeros = None if uniform else data.zeros.T.contiguous().to(device, torch.int16)
    offsets = None if data.offsets is None else data.offsets.T.contiguous().to(device, dtype)
    return WNA16Weight(qweight.contiguous().to(device), data.scales.T.contiguous().to(device, dtype), zeros,
                       data.bits, data.group_size, None if order is None else order.to(device),
                       zero_point if uniform else 0, offsets)


@triton.jit
def _shift(row, BITS: tl.constexpr):
    """Where row ``row`` of a word (a tensor or a constant) starts: pairs of rows in the word's halves."""
    return row // 2 * BITS + row % 2 * 16


@triton.jit
def _levels(q, zero):
    """``q - zero`` in float32 (exact: both are small integers). ``q`` (under 2**23) is set into the
    mantissa of 2**23, whose value is then ``2**23 + q``: one bitwise op where the integer-to-float
    conversion instruction runs at a fraction of the float units' rate and bounded these kernels."""
    return (q | 0x4B000000).to(tl.float32, bitcast=True) - (zero + 8388608.0)


@triton.jit
def _group_terms(s_ptr, z_ptr, o_ptr, group, mask, ZEROS: tl.constexpr, ZERO_POINT: tl.constexpr,
                 OFFSETS: tl.constexpr):
    """A group's scale, zero point and offset in float32 at offsets ``group`` (zero where ``mask``
    is off): the zero point read (``ZEROS``) or the constant ``ZERO_POINT``, the offset read
    (``OFFSETS``) or zero."""
    scale = tl.load(s_ptr + group, mask=mask, other=0.0).to(tl.float32)
    if ZEROS:
        zero = tl.load(z_ptr + group, mask=mask, other=0).to(tl.float32)
    else:
        zero = tl.full(scale.shape, ZERO_POINT, tl.float32)
    if OFFSETS:
        offset = tl.load(o_ptr + group, mask=mask, other=0.0).to(tl.float32)
    else:
        offset = tl.zeros(scale.shape, tl.float32)
    return scale, zero, offset


@triton.jit
def _biased_level(packed, high, level_mask, level_base, J: tl.constexpr, BITS: tl.constexpr):
    """``2**BITS + q`` in float32 for the ``J``-th value of each word (``high``: the words shifted
    right by 16; ``level_mask``: the top ``BITS`` bits of a float32 mantissa, ``level_base``: the
    bits of ``2**BITS``): the value moved to the top of the mantissa of ``2**BITS`` and or-ed into
    it. A left shift (which the compiler may issue on the multiply units) and one masked or, where an
    exact level needs a right shift, a mask, an or and a float subtraction. The values past the
    mantissa's reach from ``packed`` are taken from ``high``."""
    TOP: tl.constexpr = 23 - BITS
    AT: tl.constexpr = J // 2 * BITS + J % 2 * 16  # where _shift puts row J
    if TOP - AT >= 0:
        moved = packed << (TOP - AT)
    else:
        moved = high << (TOP - (AT - 16))
    return ((moved & level_mask) | level_base).to(tl.float32, bitcast=True)


@triton.jit
def _store_split(acc, out_ptr, partial_ptr, ticket, out_offsets, partial_offsets, ok, split, M, N,
                 SPLIT_K: tl.constexpr):
    """Write a program's float32 sums ``acc`` to ``out_ptr + out_offsets`` in its dtype: directly
    without a split; with one, stored as split ``split``'s partial sums ([SPLIT_K, M, N] at
    ``partial_ptr``), and the last program to arrive at the output tile's ``ticket`` adds the
    tile's splits in split order and writes them. One launch, no zeroed float32 buffer to cast
    afterwards, no atomic adds on the data (with Triton's default semantics each fenced the GPU
    and invalidated L1)."""
    if SPLIT_K == 1:
        tl.store(out_ptr + out_offsets, acc.to(out_ptr.dtype.element_ty), mask=ok)
    else:
        tl.store(partial_ptr + (split * M).to(tl.int64) * N + partial_offsets, acc, mask=ok)
        # Every thread's partial sums are stored before the ticket is taken (its release orders them).
        tl.debug_barrier()
        if tl.atomic_add(ticket, 1, sem="acq_rel") == SPLIT_K - 1:
            # Started from split 0's sums, not tl.zeros: the Gluon kernel (wna16_wgmma.py) calls this
            # too, and its tensors all need a layout.
            total = tl.load(partial_ptr + partial_offsets, mask=ok, other=0.0, cache_modifier=".cg")
            for part in range(1, SPLIT_K):
                total += tl.load(partial_ptr + (part * M).to(tl.int64) * N + partial_offsets, mask=ok, other=0.0,
                                 cache_modifier=".cg")
            tl.store(out_ptr + out_offsets, total.to(out_ptr.dtype.element_ty), mask=ok)
            tl.atomic_xchg(ticket, 0)  # ready for the next launch


@triton.jit
def _wna16_kernel(x_ptr, q_ptr, s_ptr, z_ptr, o_ptr, out_ptr, partial_ptr, ticket_ptr, M, N, K, stride_xm, stride_qk,
                  stride_sg, stride_om,
                  BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, IEEE: tl.constexpr, WORDS_ONCE: tl.constexpr,
                  ZEROS: tl.constexpr, ZERO_POINT: tl.constexpr, OFFSETS: tl.constexpr):
    PER: tl.constexpr = 32 // BITS
    # A K tile inside one group (tiles start at multiples of BLOCK_K) reads one row of scales
    # and zero points instead of one per weight.
    ONE_GROUP: tl.constexpr = GROUP % BLOCK_K == 0
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(2)
    reduce = tl.arange(0, BLOCK_K)
    row_ok, col_ok = rows < M, cols < N
    span = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    start = split * span
    # The dequantized weight is the second operand: as the first (from registers) Triton 3.6 and
    # 3.7 leave Hopper's matrix instructions pending while the next K tile overwrites their
    # registers (tests/sm90_dots.py; plans of that form summed wrongly on an H100).
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(start, tl.minimum(start + span, K), BLOCK_K):
        ks = k0 + reduce
        k_ok = ks < K
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + ks[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        tile_ok = k_ok[:, None] & col_ok[None, :]
        if WORDS_ONCE:
            # Each word read once, then spread over its PER rows in registers (K is a whole
            # number of words, so a word is in range exactly when its first row is).
            word_rows = k0 // PER + tl.arange(0, BLOCK_K // PER)
            packed = tl.load(q_ptr + word_rows[:, None].to(tl.int64) * stride_qk + cols[None, :],
                             mask=(word_rows < K // PER)[:, None] & col_ok[None, :], other=0,
                             eviction_policy="evict_first")
            words = tl.reshape(tl.broadcast_to(packed[:, None, :], (BLOCK_K // PER, PER, BLOCK_N)), (BLOCK_K, BLOCK_N))
        else:
            words = tl.load(q_ptr + (ks // PER)[:, None].to(tl.int64) * stride_qk + cols[None, :], mask=tile_ok,
                            other=0, eviction_policy="evict_first")
        q = (words >> _shift(ks % PER, BITS)[:, None]) & ((1 << BITS) - 1)
        if ONE_GROUP:
            group = (k0 // GROUP) * stride_sg + cols.to(tl.int64)
            scale, zero, offset = _group_terms(s_ptr, z_ptr, o_ptr, group[None, :], col_ok[None, :], ZEROS,
                                               ZERO_POINT, OFFSETS)
        else:
            group = (ks // GROUP)[:, None].to(tl.int64) * stride_sg + cols[None, :]
            scale, zero, offset = _group_terms(s_ptr, z_ptr, o_ptr, group, tile_ok, ZEROS, ZERO_POINT, OFFSETS)
        if OFFSETS:
            w = (_levels(q, zero) * scale + offset).to(x.dtype)
        else:
            w = (_levels(q, zero) * scale).to(x.dtype)
        acc += tl.dot(x, w, input_precision="ieee" if IEEE else "tf32")
    _store_split(acc, out_ptr, partial_ptr, ticket_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1),
                 rows[:, None].to(tl.int64) * stride_om + cols[None, :], rows[:, None].to(tl.int64) * N + cols[None, :],
                 row_ok[:, None] & col_ok[None, :], split, M, N, SPLIT_K)


@triton.jit
def _pair(packed, i: tl.constexpr, BITS: tl.constexpr, pair_mask, pair_base):
    """Rows ``2i`` and ``2i + 1`` of each word in the halves of a register, or-ed into ``pair_base``."""
    return ((packed >> (i * BITS)) & pair_mask) | pair_base


@triton.jit
def _pair_levels(packed, pair_mask, pair_base, dtype: tl.constexpr, BITS: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """The [BLOCK_N, BLOCK_K] levels ``LEVEL + q`` in ``dtype`` of words [BLOCK_N, BLOCK_K / PER]
    (``pair_base``: ``LEVEL``'s bits in both halves). A word's pairs are joined (tl.join keeps its
    new, last dimension in one thread's registers; the outer join's is the faster index, so pairs
    0, 2 inside and 1, 3 outside give 0, 1, 2, 3): each thread makes a whole word's values,
    contiguous along K, stored to shared memory at once."""
    if 32 // BITS == 8:
        halves = tl.join(tl.join(_pair(packed, 0, BITS, pair_mask, pair_base),
                                 _pair(packed, 2, BITS, pair_mask, pair_base)),
                         tl.join(_pair(packed, 1, BITS, pair_mask, pair_base),
                                 _pair(packed, 3, BITS, pair_mask, pair_base)))
    else:
        halves = tl.join(_pair(packed, 0, BITS, pair_mask, pair_base), _pair(packed, 1, BITS, pair_mask, pair_base))
    return _pair_values(halves, dtype, BLOCK_N, BLOCK_K)


@triton.jit
def _pair_values(halves, dtype: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """[BLOCK_N, BLOCK_K] values in ``dtype`` of registers ``halves`` holding two a register (the
    lower half first along K), in any shape of BLOCK_N * BLOCK_K / 2 elements that lists them in order."""
    halves = tl.reshape(halves, (BLOCK_N, BLOCK_K // 2))
    low = halves.to(tl.int16).to(dtype, bitcast=True)
    high = (halves >> 16).to(tl.int16).to(dtype, bitcast=True)
    return tl.reshape(tl.join(low, high), (BLOCK_N, BLOCK_K))


@triton.jit
def _wna16_pairs_kernel(x_ptr, q_ptr, s_ptr, z_ptr, o_ptr, out_ptr, partial_ptr, ticket_ptr, M, N, K, stride_xm,
                        stride_qk, stride_sg, stride_om, pair_mask, pair_base, BITS: tl.constexpr, GROUP: tl.constexpr,
                        LEVEL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        SPLIT_K: tl.constexpr, ZEROS: tl.constexpr, ZERO_POINT: tl.constexpr, OFFSETS: tl.constexpr,
                        WEIGHT_FIRST: tl.constexpr):
    """``x W^T`` with the weight dequantized two values a 32-bit register in the activations'
    16-bit type: a shift and a mask put a pair of rows into a register's halves (:func:`_pair`),
    or-ed into the bits of ``LEVEL`` (``pair_base``: 128 in bfloat16, 1024 in float16, whose last
    mantissa bit is worth 1) they read ``LEVEL + q``; one packed subtraction of ``LEVEL + zero``
    (exact) and one packed multiplication by the scale (the one rounding, as in float32 then
    rounded) make the weight. The float32 levels of ``_wna16_kernel`` cost 3-4 times the
    instructions a weight, which bounded its tiles far below the library's bf16 GEMM
    (docs/quantization.md). The weight is the second operand, so Hopper's matrix instructions read
    it from shared memory: as the first operand (from registers) Triton 3.6 and 3.7 issued them
    asynchronously without keeping their operand registers alive, the next K tile's loads
    overwrote registers still being read, and 4 of 24 tile plans summed wrongly on an H100
    (docs/quantization.md). ``WEIGHT_FIRST`` takes it as the first operand all the same (``W x^T``,
    transposed back at the end), each K tile's instructions waited for in full before the next:
    no round trip through shared memory, no overlap either (faster for 16-row tiles, H100
    2026-12-07). K tiles lie inside one group; K split as ``_wna16_kernel``'s."""
    PER: tl.constexpr = 32 // BITS
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(2)
    row_ok, col_ok = rows < M, cols < N
    dtype = x_ptr.dtype.element_ty
    span = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    start = split * span
    if WEIGHT_FIRST:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(start, tl.minimum(start + span, K), BLOCK_K):
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + (k0 + tl.arange(0, BLOCK_K))[None, :],
                    mask=row_ok[:, None], other=0.0)
        packed = tl.load(q_ptr + (k0 // PER + tl.arange(0, BLOCK_K // PER))[None, :].to(tl.int64) * stride_qk
                         + cols[:, None], mask=col_ok[:, None], other=0, eviction_policy="evict_first")
        levels = _pair_levels(packed, pair_mask, pair_base, dtype, BITS, BLOCK_N, BLOCK_K)
        group = (k0 // GROUP) * stride_sg + cols.to(tl.int64)
        scale, zero, offset = _group_terms(s_ptr, z_ptr, o_ptr, group, col_ok, ZEROS, ZERO_POINT, OFFSETS)
        w = (levels - (zero + LEVEL).to(dtype)[:, None]) * scale.to(dtype)[:, None]
        if OFFSETS:
            w += offset.to(dtype)[:, None]
        if WEIGHT_FIRST:
            acc = tl.dot(w, tl.trans(x), acc)
            # Reading the sums here (K < 0 never holds, but the compiler cannot know) makes Triton
            # wait for this tile's matrix instructions before the next tile writes their registers.
            acc = tl.where(K < 0, 0.0, acc)
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    if WEIGHT_FIRST:
        acc = tl.trans(acc)
    _store_split(acc, out_ptr, partial_ptr, ticket_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1),
                 rows[:, None].to(tl.int64) * stride_om + cols[None, :], rows[:, None].to(tl.int64) * N + cols[None, :],
                 row_ok[:, None] & col_ok[None, :], split, M, N, SPLIT_K)


@triton.jit
def _wna16_gemv_kernel(x_ptr, q_ptr, s_ptr, z_ptr, o_ptr, out_ptr, partial_ptr, ticket_ptr, M, N, K, stride_xm,
                       stride_qk, stride_sg, stride_om, level_mask, level_base, BITS: tl.constexpr, GROUP: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, PREFETCH: tl.constexpr,
                       ZERO_FROM_SUMS: tl.constexpr, ZEROS: tl.constexpr, ZERO_POINT: tl.constexpr,
                       OFFSETS: tl.constexpr, SHARED_SHIFTS: tl.constexpr, DEPENDENT: tl.constexpr):
    """One row of ``x`` a program, on the vector units: the float32 products of ``x`` and the integer
    levels summed per packed word row and column, scaled once per K tile (or per word row, where a tile spans groups),
    and summed across the tile's threads once at the end. With ``SPLIT_K`` programs per output
    tile, each stores its partial sums and the last to arrive (a ticket counter per tile) adds them
    in split order and writes the output: one launch, no zeroed float32 buffer to cast afterwards.
    ``DEPENDENT``: launched as a programmatic dependent of the launch before (``dependent.py``),
    whose results (``x``; and the memory this launch writes may be memory that launch still reads)
    are waited for after the first weight tile is requested."""
    PER: tl.constexpr = 32 // BITS
    WORDS: tl.constexpr = BLOCK_K // PER
    row, tile, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    word = tl.arange(0, WORDS)
    span = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    start = split * span
    x_row = x_ptr + row.to(tl.int64) * stride_xm
    end = tl.minimum(start + span, K)
    acc = tl.zeros((WORDS, BLOCK_N), dtype=tl.float32)
    # PREFETCH requests the next tile's words, scales and zero points before this tile's arithmetic:
    # Triton pipelines only loads that feed tl.dot, and one tile in flight a thread left the
    # weight read latency-bound (docs/quantization.md); it costs registers (occupancy) instead.
    if PREFETCH:
        packed, scale, zero, offset = _gemv_tile(q_ptr, s_ptr, z_ptr, o_ptr, start, end, word, cols, col_ok, stride_qk,
                                                 stride_sg, PER, GROUP, BLOCK_K, ZEROS, ZERO_POINT, OFFSETS)
    wait_for_the_launch_before(DEPENDENT)
    for k0 in range(start, end, BLOCK_K):
        if PREFETCH:
            next_packed, next_scale, next_zero, next_offset = _gemv_tile(
                q_ptr, s_ptr, z_ptr, o_ptr, k0 + BLOCK_K, end, word, cols, col_ok, stride_qk, stride_sg, PER, GROUP,
                BLOCK_K, ZEROS, ZERO_POINT, OFFSETS)
        else:
            packed, scale, zero, offset = _gemv_tile(q_ptr, s_ptr, z_ptr, o_ptr, k0, end, word, cols, col_ok, stride_qk,
                                                     stride_sg, PER, GROUP, BLOCK_K, ZEROS, ZERO_POINT, OFFSETS)
        word_ok = k0 // PER + word < end // PER
        products = tl.zeros((WORDS, BLOCK_N), dtype=tl.float32)
        if ZERO_FROM_SUMS or OFFSETS:
            x_sums = tl.zeros((WORDS,), dtype=tl.float32)
        if SHARED_SHIFTS:
            products, x_sums = _shared_shift_products(x_row, k0, word, word_ok, packed, zero, level_mask, level_base)
            acc += products * scale
        elif ZERO_FROM_SUMS:
            # Sum x * (2**BITS + q) (a shift and a masked or a level, no float subtraction), then
            # take (2**BITS + zero) * sum(x) off once a word row: about half the instructions of
            # the exact levels, which bounded this kernel below the memory's speed.
            high = packed >> 16
            for j in tl.static_range(PER):
                x = tl.load(x_row + k0 + word * PER + j, mask=word_ok, other=0.0).to(tl.float32)
                x_sums += x
                products += x[:, None] * _biased_level(packed, high, level_mask, level_base, j, BITS)
            acc += (products - (zero + (1 << BITS)) * x_sums[:, None]) * scale
        else:
            for j in tl.static_range(PER):
                x = tl.load(x_row + k0 + word * PER + j, mask=word_ok, other=0.0).to(tl.float32)
                if OFFSETS:
                    x_sums += x
                products += x[:, None] * _levels((packed >> _shift(j, BITS)) & ((1 << BITS) - 1), zero)
            acc += products * scale
        if OFFSETS:
            acc += offset * x_sums[:, None]
        if PREFETCH:
            packed, scale, zero, offset = next_packed, next_scale, next_zero, next_offset
    _store_split(tl.sum(acc, 0), out_ptr, partial_ptr, ticket_ptr + row * tl.num_programs(1) + tile,
                 row.to(tl.int64) * stride_om + cols, row.to(tl.int64) * N + cols, col_ok, split, M, N, SPLIT_K)


@triton.jit
def _shared_shift_products(x_row, k0, word, word_ok, packed, zero, mask_15, base_256):
    """For 4-bit words and bfloat16 ``x``: sum(x * (q - zero)) over each word's 8 rows [WORDS,
    BLOCK_N], and sum(x) [WORDS]. A row's level is ``base + q`` in float32, ``base`` 256 or 16, and
    the sum starts from -(sum(x * base) + zero * sum(x)) (the first multiply-add's addend). One
    shift places two rows' values (4 bits apart in the word: ``_shift``'s pairs layout) at mantissa
    bits 15-18 and 19-22, and one masked or each makes them 256 + q (256's bits) and 16 + q
    (16's): 2.5 instructions a weight where ``_biased_level`` takes 3. ``x`` is read two values a
    32-bit load and widened to float32 by a shift or a mask (a bfloat16 is the
    top half of a float32). The larger base costs accuracy only against float32's mantissa: a
    word row's sum is within 2**-16 of sum(|x|) * 256 before the bases are taken off. ``mask_15``
    (bits 15-18) and ``base_256`` (256's bits) are arguments, not constants, so that each masked or
    is one instruction (it takes one immediate operand: with two constants the compiler made two)."""
    pairs = (x_row + k0).to(tl.pointer_type(tl.int32), bitcast=True) + word * 4
    v0 = tl.load(pairs, mask=word_ok, other=0)
    v1 = tl.load(pairs + 1, mask=word_ok, other=0)
    v2 = tl.load(pairs + 2, mask=word_ok, other=0)
    v3 = tl.load(pairs + 3, mask=word_ok, other=0)
    # Row j of the word row is x[2m] (the low half of v_m) for j = 2m, x[2m + 1] (the high half) for j = 2m + 1.
    x0, x1 = (v0 << 16).to(tl.float32, bitcast=True), (v0 & -65536).to(tl.float32, bitcast=True)
    x2, x3 = (v1 << 16).to(tl.float32, bitcast=True), (v1 & -65536).to(tl.float32, bitcast=True)
    x4, x5 = (v2 << 16).to(tl.float32, bitcast=True), (v2 & -65536).to(tl.float32, bitcast=True)
    x6, x7 = (v3 << 16).to(tl.float32, bitcast=True), (v3 & -65536).to(tl.float32, bitcast=True)
    # Rows 2i at bits 4i, rows 2i + 1 at 16 + 4i: rows (0, 2) shifted left 15, (4, 6) left 7, (1, 3)
    # right 1, (5, 7) right 9 land at bits 15 and 19.
    low, low_high, high, high_high = packed << 15, packed << 7, packed >> 1, packed >> 9
    mask_19, base_16 = mask_15 << 4, base_256 - 0x02000000
    at_15 = (x0 + x4) + (x1 + x5)
    at_19 = (x2 + x6) + (x3 + x7)
    x_sums = at_15 + at_19
    bases = (at_15 * 256.0 + at_19 * 16.0)[:, None] + zero * x_sums[:, None]
    products = x0[:, None] * _at_bits(low, mask_15, base_256) - bases
    products += x2[:, None] * _at_bits(low, mask_19, base_16)
    products += x4[:, None] * _at_bits(low_high, mask_15, base_256)
    products += x6[:, None] * _at_bits(low_high, mask_19, base_16)
    products += x1[:, None] * _at_bits(high, mask_15, base_256)
    products += x3[:, None] * _at_bits(high, mask_19, base_16)
    products += x5[:, None] * _at_bits(high_high, mask_15, base_256)
    products += x7[:, None] * _at_bits(high_high, mask_19, base_16)
    return products, x_sums


@triton.jit
def _at_bits(moved, mask, base):
    """``base``'s float32 with the bits of ``moved`` under ``mask`` or-ed into its mantissa."""
    return ((moved & mask) | base).to(tl.float32, bitcast=True)


@triton.jit
def _gemv_tile(q_ptr, s_ptr, z_ptr, o_ptr, k0, end, word, cols, col_ok, stride_qk, stride_sg, PER: tl.constexpr,
               GROUP: tl.constexpr, BLOCK_K: tl.constexpr, ZEROS: tl.constexpr, ZERO_POINT: tl.constexpr,
               OFFSETS: tl.constexpr):
    """The packed words [BLOCK_K / PER, BLOCK_N] of the K tile from ``k0`` (rows from ``end`` on
    read as zeros, none at all past it) and their float32 scales, zero points and offsets: one row of them
    where the tile is inside one group, else one a word row (a word's rows share a group, and the
    rows of one group read the same cache lines again)."""
    word_rows = k0 // PER + word
    word_ok = word_rows < end // PER
    packed = tl.load(q_ptr + word_rows[:, None].to(tl.int64) * stride_qk + cols[None, :],
                     mask=word_ok[:, None] & col_ok[None, :], other=0, eviction_policy="evict_first")
    if GROUP % BLOCK_K == 0:
        group = (k0 // GROUP) * stride_sg + cols.to(tl.int64)
        group_ok = col_ok & (k0 < end)
        scale, zero, offset = _group_terms(s_ptr, z_ptr, o_ptr, group[None, :], group_ok[None, :], ZEROS, ZERO_POINT,
                                           OFFSETS)
    else:
        group = (word_rows * PER // GROUP)[:, None].to(tl.int64) * stride_sg + cols[None, :]
        group_ok = word_ok[:, None] & col_ok[None, :]
        scale, zero, offset = _group_terms(s_ptr, z_ptr, o_ptr, group, group_ok, ZEROS, ZERO_POINT, OFFSETS)
    return packed, scale, zero, offset


@triton.jit
def _dequantize_kernel(q_ptr, s_ptr, z_ptr, o_ptr, out_ptr, N, K, stride_qk, stride_sg, stride_ok,
                       BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                       ZEROS: tl.constexpr, ZERO_POINT: tl.constexpr, OFFSETS: tl.constexpr):
    # Each packed word is read once and written as its PER rows, a row of the tile at a time, with
    # one row of scales a program where its K tile lies in one group: the path that dequantizes
    # the whole weight every step at many rows is bound by its bandwidth only if it issues few
    # instructions an element (sm_90: 600 a 64 x 128 tile against 824 when each row reread its word).
    PER: tl.constexpr = 32 // BITS
    ONE_GROUP: tl.constexpr = GROUP % BLOCK_K == 0
    k0 = tl.program_id(0) * BLOCK_K
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    word_rows = k0 // PER + tl.arange(0, BLOCK_K // PER)
    col_ok = cols < N
    ok = (word_rows < K // PER)[:, None] & col_ok[None, :]
    packed = tl.load(q_ptr + word_rows[:, None].to(tl.int64) * stride_qk + cols[None, :], mask=ok, other=0)
    if ONE_GROUP:
        group = (k0 // GROUP) * stride_sg + cols[None, :].to(tl.int64)
        scale, zero, offset = _group_terms(s_ptr, z_ptr, o_ptr, group, col_ok[None, :], ZEROS, ZERO_POINT, OFFSETS)
    out_rows = out_ptr + (word_rows * PER)[:, None].to(tl.int64) * stride_ok + cols[None, :]
    for j in tl.static_range(PER):
        if not ONE_GROUP:
            group = ((word_rows * PER + j) // GROUP)[:, None].to(tl.int64) * stride_sg + cols[None, :]
            scale, zero, offset = _group_terms(s_ptr, z_ptr, o_ptr, group, ok, ZEROS, ZERO_POINT, OFFSETS)
        q = (packed >> _shift(j, BITS)) & ((1 << BITS) - 1)
        tl.store(out_rows + j * stride_ok, (_levels(q, zero) * scale + offset).to(out_ptr.dtype.element_ty), mask=ok)


def dequantize(weight: WNA16Weight, dtype: torch.dtype) -> torch.Tensor:
    """W^T [K, N] in ``dtype``, its rows in the repacked (group) order, each value rounded once
    from the same float32 ``(q - zero) * scale`` the GEMM computes."""
    k, n = weight.qweight.shape[0] * (32 // weight.bits), weight.qweight.shape[1]
    out = torch.empty(k, n, dtype=dtype, device=weight.qweight.device)
    zeros, offsets, group_constants = weight.group_arguments()
    # K tiles inside one group where a whole number of words fits the group (GGUF's 16 and 32, GPTQ's 32 up).
    block_k = math.gcd(64, weight.group_size)
    if block_k < 32 // weight.bits:
        block_k = 64
    _dequantize_kernel[(triton.cdiv(k, block_k), triton.cdiv(n, 128))](
        weight.qweight, weight.scales, zeros, offsets, out, n, k, weight.qweight.stride(0), weight.scales.stride(0),
        out.stride(0), BITS=weight.bits, GROUP=weight.group_size, BLOCK_K=block_k, BLOCK_N=128, **group_constants)
    return out


def plan(m: int, n: int, k: int, sm_count: int = 132, element_size: int = 2, pairs_fit: bool = True,
         hopper: bool = False) -> dict:
    """Tiles for an [m, k] by [n, k] product, 16-bit activations, from sweeps on an H100 and an
    H200 (``benchmarks/kernels_gpu.py wna16-sweep``, Llama-3-8B's projections, docs/quantization.md).

    One row: the vector kernel, 64 columns a program, 256-deep K tiles requested a tile ahead, K split
    4 ways (8 for down's 14336-deep rows), its levels biased (``zero_from_sums``) and, for 4-bit
    weights under bfloat16 activations, two rows' levels a shift (``shared_shifts``): a layer's four
    projections 63.7 us against 70.1 for the earlier 512-deep tiles (H100, 2026-12-07; without the
    shifts these tiles were within 3% of those, H100 2026-12-06). Where
    the weight suits the pairs kernel (``pairs_fit``: 16-bit activations that hold its levels,
    groups of at least 128 rows: :func:`_pairs_fit`), H100 2026-12-07 (a layer's four projections):
    up to 16 rows its 16-row tile with the weight as the first operand, K split 4 ways (8 for
    14336-deep rows; 123 us at 16 rows against 144 for the tile kernel, bf16 151); up to 64 rows
    its 64-row tiles, 128 columns unsplit for wide outputs (gate/up), else 64 split 4 ways (154 us
    at 64 rows against 335, bf16 156); up to 256 rows wide outputs on 128- and 256-row tiles (gate/up
    103 us at 128 rows against 193 dense, 187 at 256 against 209), the rest the weight dequantized
    once and the library's GEMM, as everything past 256 rows. Without the pairs kernel, the tile
    kernel's 16-row tile (K split 8 ways, each word read once) and 64-row tiles, then dense.
    Float32 activations (``element_size`` 4) keep half the K depth and pipeline stages of the
    first plans: their tiles need twice the shared memory (the 16-bit decode tiles in float32
    asked an H100 for 352 KB of its 227). On Hopper (``hopper``) from 2 to 16 rows, where the pairs
    kernel would, the Gluon kernel that dequantizes the weight into the matrix instructions'
    registers (``weight_first``, ``wna16_wgmma.py``) on its 8-row tile to 8 rows, else 16, 64 columns,
    K split 4 ways in 128-deep tiles (64 for wide outputs): a layer's four projections 82 us at 16
    rows against 123 on the pairs kernel (bf16 156; H100 2026-12-07). From 17 to 256 rows the
    Gluon kernel with its first K tile apart (``overlap``): wide outputs (gate/up) on 64 x 128
    tiles to 64 rows, 128 x 128 to 128; the
    rest to 64 rows on 64 x 64 tiles K split 4 ways (64 deep for outputs wider than the input, qkv);
    to 128 rows qkv on 128 x 64 tiles, 14336-deep rows (down) on 64 x 64 split 2 ways; past 128 rows
    qkv dense. The others, o from 65 rows and gate/up and down past 128, on the kernel that
    dequantizes the weight into the matrix instructions' registers (``weight_first``): 128 x 64 x
    128 tiles (split 2 ways to 128 rows), gate/up 128 x 64 x 64, down 128 x 128 x 128 split 2 ways
    (H100 2026-12-07, a layer's four projections: 117 us at 64 rows, 174 at 128, 298 at 256,
    against bf16's 157, 170 and 196)."""
    if element_size > 2:
        if m <= 16:
            split = max(1, min(k // 256, (2 * sm_count) // triton.cdiv(n, 64)))
            return dict(block_m=16, block_n=64, block_k=64, split_k=split, num_warps=4, num_stages=2)
        return dict(block_m=64, block_n=128 if m > 64 else 64, block_k=32 if m > 64 else 64, split_k=1, num_warps=4,
                    num_stages=2)
    if m == 1:
        return dict(block_n=64, block_k=256, split_k=8 if k > 8192 else 4, gemv=True, num_warps=4, num_stages=1,
                    prefetch=True, zero_from_sums=True, shared_shifts=True)
    wide = n > 16384
    if pairs_fit and hopper and m <= 16:
        return dict(wgmma=True, weight_first=True, block_m=8 if m <= 8 else 16, block_n=64, block_k=64 if wide else 128,
                    split_k=4, num_warps=4, num_stages=4)
    if pairs_fit and hopper and m <= 256:
        if wide:
            if m <= 64:
                return dict(wgmma=True, overlap=True, block_m=64, block_n=128, block_k=64, split_k=1, num_warps=4,
                            num_stages=4)
            if m <= 128:
                return dict(wgmma=True, overlap=True, block_m=128, block_n=128, block_k=64, split_k=1, num_warps=8,
                            num_stages=4)
            return dict(wgmma=True, weight_first=True, block_m=128, block_n=64, block_k=64, split_k=1, num_warps=4,
                        num_stages=4)
        if m <= 64:
            return dict(wgmma=True, overlap=True, block_m=64, block_n=64, block_k=64 if n > k else 128, split_k=4,
                        num_warps=4, num_stages=4 if k > 8192 else 3)
        if n > k:
            if m > 128:
                return dict(dense=True)
            return dict(wgmma=True, overlap=True, block_m=128, block_n=64, block_k=128, split_k=1, num_warps=8,
                        num_stages=4)
        if m <= 128 and k > 8192:
            return dict(wgmma=True, overlap=True, block_m=64, block_n=64, block_k=128, split_k=2, num_warps=4,
                        num_stages=4)
        if k > 8192:
            return dict(wgmma=True, weight_first=True, block_m=128, block_n=128, block_k=128, split_k=2, num_warps=8,
                        num_stages=4)
        return dict(wgmma=True, weight_first=True, block_m=128, block_n=64, block_k=128, split_k=2 if m <= 128 else 1,
                    num_warps=4, num_stages=4)
    if pairs_fit:
        if m <= 16:
            return dict(pairs=True, weight_first=True, block_m=16, block_n=64, block_k=128,
                        split_k=8 if k > 8192 else 4, num_warps=4, num_stages=4)
        if m <= 64:
            if wide:
                return dict(pairs=True, block_m=64, block_n=128, block_k=128, split_k=1, num_warps=4, num_stages=3)
            return dict(pairs=True, block_m=64, block_n=64, block_k=128, split_k=4, num_warps=4, num_stages=3)
        if m <= 256 and wide:
            return dict(pairs=True, block_m=128 if m <= 128 else 256, block_n=128, block_k=64, split_k=1, num_warps=8,
                        num_stages=3)
        return dict(dense=True)
    if m <= 16:
        return dict(block_m=16, block_n=64, block_k=128, split_k=8, words_once=True, num_warps=4, num_stages=4)
    if m <= 64:
        return dict(block_m=64, block_n=64, block_k=64, split_k=4, num_warps=4, num_stages=3)
    return dict(dense=True)


def _hopper(device: torch.device) -> bool:
    """Whether ``device`` is a Hopper GPU (sm_90), which the Gluon kernel is written for."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9


FITTED_TILES: dict[tuple, dict] = {}
"""Plans that had to shrink to fit the GPU's shared memory, by the plan and launch they replace."""


def matmul(weight: WNA16Weight, x: torch.Tensor, bias: torch.Tensor | None = None, **tiles) -> torch.Tensor:
    """``x @ W.T + bias`` in ``x``'s dtype; ``tiles`` override :func:`plan`'s choice."""
    rows = x.reshape(-1, x.shape[-1])
    if weight.order is not None:
        rows = rows.index_select(1, weight.order)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    m, k = rows.shape
    n = weight.qweight.shape[1]
    if not tiles:
        sm = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 132
        tiles = plan(m, n, k, sm, x.element_size(), _pairs_fit(weight, rows.dtype, 128), hopper=_hopper(x.device))
    if tiles.get("dense"):
        # Many rows: the weight dequantized once, then the library's GEMM (the dequantization
        # costs about what reading and writing the dense weight does, small beside the product).
        out = torch.mm(rows, dequantize(weight, x.dtype))
    elif tiles.get("gemv"):
        out = _gemv(weight, rows, tiles)
    elif tiles.get("pairs") or tiles.get("wgmma"):
        out = _pairs(weight, rows, tiles)
    else:
        out = _tiled(weight, rows, tiles)
    if bias is not None:
        out = out + bias
    return out.view(*x.shape[:-1], n)


def _tiled(weight: WNA16Weight, rows: torch.Tensor, tiles: dict) -> torch.Tensor:
    m, k = rows.shape
    n = weight.qweight.shape[1]
    split = tiles["split_k"]
    out = torch.empty(m, n, dtype=rows.dtype, device=rows.device)
    if m:
        zeros, offsets, group_constants = weight.group_arguments()
        grid, partial, counters = _split_launch(m, n, tiles, split, out)

        def launch(tiles: dict) -> None:
            _wna16_kernel[grid](rows, weight.qweight, weight.scales, zeros, offsets, out, partial, counters, m, n, k,
                                rows.stride(0), weight.qweight.stride(0), weight.scales.stride(0), out.stride(0),
                                BITS=weight.bits, GROUP=weight.group_size, BLOCK_M=tiles["block_m"], BLOCK_N=tiles["block_n"],
                                BLOCK_K=tiles["block_k"], SPLIT_K=split, IEEE=rows.dtype == torch.float32,
                                WORDS_ONCE=tiles.get("words_once", False),
                                num_warps=tiles["num_warps"], num_stages=tiles["num_stages"], **group_constants)

        key = (tuple(sorted(tiles.items())), n, k, rows.dtype, weight.bits, weight.group_size, rows.device,
               tuple(group_constants.items()))
        launch_fitting(FITTED_TILES, key, tiles, launch, fewer_stages_then_shallower("block_k", 32))
    return out


def _split_launch(m: int, n: int, tiles: dict, split: int, out: torch.Tensor) -> tuple[tuple, torch.Tensor, torch.Tensor]:
    """A tiled launch's grid with K split ``split`` ways, its float32 partial sums [split, m, n] and
    the output tiles' tickets (``out`` for both, never read, without a split)."""
    grid = (triton.cdiv(m, tiles["block_m"]), triton.cdiv(n, tiles["block_n"]), split)
    if split == 1:
        return grid, out, out
    return grid, torch.empty(split, m, n, dtype=torch.float32, device=out.device), tickets(out.device, grid[0] * grid[1])


def _level_constants(bits: int) -> tuple[int, int]:
    """``_biased_level``'s mask and base, passed as arguments rather than written in the kernel: as
    values in registers the compiler joins the mask and the or into one instruction (with both as
    immediates it issued two: an instruction takes one)."""
    top = 23 - bits
    return ((1 << bits) - 1) << top, (127 + bits) << 23


def _gemv(weight: WNA16Weight, rows: torch.Tensor, tiles: dict) -> torch.Tensor:
    m, k = rows.shape
    n = weight.qweight.shape[1]
    if weight.group_size % (32 // weight.bits):  # a word's rows in two groups: the tile kernel's case
        return _tiled(weight, rows, plan(max(m, 2), n, k, element_size=rows.element_size()))
    split, tiles_n = tiles["split_k"], triton.cdiv(n, tiles["block_n"])
    out = torch.empty(m, n, dtype=rows.dtype, device=rows.device)
    if m:
        partial = torch.empty(split, m, n, dtype=torch.float32, device=rows.device) if split > 1 else out
        zeros, offsets, group_constants = weight.group_arguments()
        shared_shifts = _shared_shifts_fit(weight, rows, tiles)
        _wna16_gemv_kernel[(m, tiles_n, split)](
            rows, weight.qweight, weight.scales, zeros, offsets, out, partial, tickets(rows.device, m * tiles_n), m, n, k,
            rows.stride(0), weight.qweight.stride(0), weight.scales.stride(0), out.stride(0),
            *(SHARED_SHIFT_CONSTANTS if shared_shifts else _level_constants(weight.bits)), BITS=weight.bits,
            GROUP=weight.group_size, BLOCK_N=tiles["block_n"],
            BLOCK_K=tiles["block_k"], SPLIT_K=split, PREFETCH=tiles.get("prefetch", False),
            ZERO_FROM_SUMS=tiles.get("zero_from_sums", False), num_warps=tiles["num_warps"],
            num_stages=tiles["num_stages"], SHARED_SHIFTS=shared_shifts, **group_constants,
            **as_dependent(rows.device))
    return out


SHARED_SHIFT_CONSTANTS = (0x00078000, 0x43800000)
"""``shared_shifts``' mask of bits 15-18 and the bits of 256.0 (the kernel derives bits 19-22 and 16.0)."""


def _shared_shifts_fit(weight: WNA16Weight, rows: torch.Tensor, tiles: dict) -> bool:
    """Whether the vector kernel's ``shared_shifts`` option applies: asked for, 4-bit weights,
    bfloat16 rows whose pairs of values are 32-bit aligned (read as one word)."""
    return bool(tiles.get("shared_shifts")) and weight.bits == 4 and (
        rows.dtype == torch.bfloat16 and rows.stride(0) % 2 == 0 and rows.data_ptr() % 4 == 0)


PAIR_LEVELS = {torch.bfloat16: 128, torch.float16: 1024}
"""The value whose last mantissa bit is worth 1, by activation type: ``pairs`` reads ``LEVEL + q``
from ``q`` or-ed into its bits, so ``q`` must stay below ``LEVEL`` (4 bits in bfloat16, 4 or 8 in float16)."""


def _pairs_fit(weight: WNA16Weight, dtype: torch.dtype, block_k: int) -> bool:
    """Whether the pairs kernel takes this weight with ``dtype`` activations and K tiles of
    ``block_k`` rows: not float32 activations, nor 8 bits in bfloat16 (its mantissa holds 7), nor
    groups smaller than the K tile (``_pairs`` then takes the dense path)."""
    level = PAIR_LEVELS.get(dtype)
    return level is not None and 2 ** weight.bits <= level and weight.group_size % block_k == 0


def _even_split(k_tiles: int, split: int) -> int:
    """The finest split of ``k_tiles`` K tiles, at most ``split`` ways, whose every part holds an
    even number of them, at least 2 (0 if there is none)."""
    for ways in range(split, 0, -1):
        span = triton.cdiv(k_tiles, ways)
        last = k_tiles - (ways - 1) * span
        if span % 2 == 0 and last >= 2 and last % 2 == 0:
            return ways
    return 0


def _on_the_pairs_kernel(tiles: dict) -> dict:
    """A Gluon tile narrower than the shared-memory kernel's 64-row first operand (the activations),
    which the weight-first kernel cannot take, on the pairs kernel's 16-row tile, weight first too."""
    return {**tiles, "wgmma": False, "pairs": True, "weight_first": True, "block_m": 16, "num_warps": 4}


def _pairs(weight: WNA16Weight, rows: torch.Tensor, tiles: dict) -> torch.Tensor:
    m, k = rows.shape
    n = weight.qweight.shape[1]
    if not _pairs_fit(weight, rows.dtype, tiles["block_k"]):
        return torch.mm(rows, dequantize(weight, rows.dtype))
    # The Gluon kernel copies 16 bytes of a row at a time (K is a whole number of its tiles: groups are).
    if tiles.get("wgmma") and (rows.stride(0) % 8 or rows.data_ptr() % 16):
        if tiles["block_m"] >= 64:
            return torch.mm(rows, dequantize(weight, rows.dtype))
        tiles = _on_the_pairs_kernel(tiles)
    level = PAIR_LEVELS[rows.dtype]
    split = tiles.get("split_k", 1)
    if tiles.get("wgmma") and tiles.get("weight_first"):
        # Its loop takes K tiles two at a time, the first and last apart: an even number in each split;
        # 4-bit words (four pairs), 64 columns a warpgroup, one, two or four warpgroups (four share
        # each activation tile they copy: at 512 rows 64-column tiles read the activations 448
        # times for gate/up, more than the packed weight; at 16 warps a thread has 128 registers,
        # which only tiles of up to 64 rows fit).
        fits = weight.bits == 4 and (tiles["block_n"] in (64, 128) or tiles["block_n"] == 256 and tiles["block_m"] <= 64)
        even = _even_split(k // tiles["block_k"], split) if fits else 0
        if even:
            split = even
        else:
            tiles = ({**tiles, "weight_first": False, "overlap": True} if tiles["block_m"] >= 64 else
                     _on_the_pairs_kernel(tiles))
    if tiles.get("overlap"):
        # The overlapped Gluon kernel needs a K tile in every split: split no finer than that.
        k_tiles = k // tiles["block_k"]
        while split > 1 and (split - 1) * triton.cdiv(k_tiles, split) >= k_tiles:
            split -= 1
    out = torch.empty(m, n, dtype=rows.dtype, device=rows.device)
    if m:
        zeros, offsets, group_constants = weight.group_arguments()
        half = torch.tensor(level, dtype=rows.dtype).view(torch.int16).item()
        mask = (1 << weight.bits) - 1
        grid, partial, counters = _split_launch(m, n, tiles, split, out)

        if tiles.get("wgmma"):
            from .wna16_wgmma import wna16_wgmma_kernel, wna16_wgmma_weight_first_kernel

            arguments = (rows, weight.qweight, weight.scales, zeros, offsets, out, partial, counters, m, n, k,
                         rows.stride(0), weight.qweight.stride(0), weight.scales.stride(0), out.stride(0),
                         mask | mask << 16, half | half << 16)
            constants = dict(BITS=weight.bits, GROUP=weight.group_size, LEVEL=float(level), BLOCK_M=tiles["block_m"],
                             BLOCK_N=tiles["block_n"], BLOCK_K=tiles["block_k"], SPLIT_K=split,
                             STAGES=tiles["num_stages"], **group_constants)
            if tiles.get("weight_first"):
                # A warpgroup holds 64 of the tile's columns in its registers. With 3 stages Triton 3.7
                # fails to compile its copies (it finds the activations' rows 2 bytes contiguous).
                constants["STAGES"] = max(4, constants["STAGES"])
                wna16_wgmma_weight_first_kernel[grid](*arguments, num_warps=tiles["block_n"] // 16, **constants)
            else:
                wna16_wgmma_kernel[grid](*arguments, OVERLAP=tiles.get("overlap", False), num_warps=tiles["num_warps"],
                                         **constants)
            return out

        def launch(tiles: dict) -> None:
            _wna16_pairs_kernel[grid](rows, weight.qweight, weight.scales, zeros, offsets, out, partial, counters, m, n, k,
                                      rows.stride(0), weight.qweight.stride(0), weight.scales.stride(0), out.stride(0),
                                      mask | mask << 16, half | half << 16, BITS=weight.bits, GROUP=weight.group_size,
                                      LEVEL=float(level), BLOCK_M=tiles["block_m"], BLOCK_N=tiles["block_n"],
                                      BLOCK_K=tiles["block_k"], SPLIT_K=split, num_warps=tiles["num_warps"],
                                      num_stages=tiles["num_stages"], WEIGHT_FIRST=tiles.get("weight_first", False),
                                      **group_constants)

        key = ("pairs", tuple(sorted(tiles.items())), n, k, rows.dtype, weight.bits, weight.group_size, rows.device,
               tuple(group_constants.items()))
        launch_fitting(FITTED_TILES, key, tiles, launch, fewer_stages_then_shallower("block_k", 32))
    return out
