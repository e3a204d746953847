"""LoRA shrink/expand as Triton kernels in the punica (SGMV) style: one launch per op serves every
adapter of the step.

A program owns a tile of ``BLOCK_M`` consecutive tokens (and, for expand, ``BLOCK_N`` output
features). It walks the distinct adapter slots present in its tile, smallest first, and for each
multiplies the tile's rows of that slot (the others masked to zero) by that slot's weights. A
prompt chunk's tile holds one slot, so it is one product; a decode tile of requests on different
adapters makes one product per adapter present, each reading that adapter's tile once. Tokens
with slot -1 take part in no product: shrink writes 0 for them, expand writes ``base``.

Nothing about the slots is known on the host: the launch is sized from the shapes alone and the
programs read the slots on the device, so the ops sync nothing and a step that calls them is
captured in a CUDA graph like any other (replays see the slots of the moment).

Shrink reduces over the layer's input features to a rank of 8-64 outputs (ranks over 64 take
more programs): for few tokens one program per tile would leave the GPU idle, so the reduction is
split (``SHRINK_TARGET_PROGRAMS``) into float32 partial sums. ``lora_shrink`` adds them up with
one ``sum``; ``lora_add`` (what the engine calls, contract 1.5) leaves them to its expand kernel,
which adds a tile's partial sums itself in a fixed order (so results are the same every run).
Math is float32 with one rounding to the output dtype, like the reference; float32 inputs
multiply as IEEE float32, never TF32.

``lora_add`` serves every partition of a fused projection (q, k, v of qkv; gate, up) with one
shrink and one expand launch: shrink against the partitions' A stacked along the rank, expand
over all of the output's columns, each column taking the rank slice of its partition, the
result added into ``y`` in place (rows of tokens without an adapter are not written). No torch op
runs between the two launches and nothing is read back on the host, so it is captured in a
graph as it is.

Tile sizes are a first plan: the kernels compile for sm_86 and sm_90 within 64 KiB of shared
memory; shrink, expand and the two-launch ``lora_add`` passed their tests on an H100 and an H200
and were timed end to end there (docs/lora.md).
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc

from . import skinny_matmul
from .dependent import dependent_launches, launch_options
from .skinny_matmul import skinny_product
from .tickets import tickets
from .tile_plans import nvidia

NO_SLOT: tl.constexpr = tl.constexpr(2 ** 31 - 1)
# Decode-sized steps use the smallest tile tl.dot takes, so a tile mixes as few adapters as possible.
SMALL_STEP_TOKENS = 256
# Programs the shrink's split aims at: at up to DECODE_TOKENS tokens 32, more at larger steps.
# Timed alone (benchmarks/kernels_gpu.py lora-sweep, H100, the 8B model's projections at rank 16)
# 16 programs took 14% less time than 128 over the four at 1 token and 17% at 8, and 64 took 15%
# less at 64 tokens; but end to end, where linear_lora's projection runs beside the shrink,
# batch-1 decode with an adapter took 6.723 and 6.724 ms a step at 32 against 6.840 at 16 (H100,
# one window, docs/cuda-results/h100-2026-12-07-b: 0.912x of LoRA off against 0.896x).
DECODE_TOKENS = 16
DECODE_SHRINK_PROGRAMS = 32
SHRINK_TARGET_PROGRAMS = 64
# Bytes of each row a program reads per reduction step: 128 bf16/fp16 or 64 float32 features for
# shrink, so a float32 tile takes the shared memory of a 16-bit one (128 float32 features at rank
# 64 would take 128 KiB, more than an A10 or RTX 30xx has).
SHRINK_STEP_BYTES = 256
EXPAND_STEP_BYTES = 128
EXPAND_BLOCK_N = 128
# Ranks past this (256 and 512 adapters exist) take more programs, not larger tiles.
SHRINK_MAX_BLOCK_R = 64
# lora_add's expand kernel tells apart this many partitions by the column ends it is given; a
# projection of more is served in groups of these.
MAX_SLICES = 4
# linear_lora's one-launch projection past one token only for weights up to this many elements
# (lora-sweep, H100, the 8B model at rank 16, 8 tokens: 31.0 against 43.1 us for qkv's 25M and
# 20.6 against 27.1 for o's 17M, but 123.7 against 106.1 for gate/up's 117M and 83.8 against 79.8
# for down's 59M; at one token it took 1-3 us less on all but o, 0.8 more there).
FUSED_MAX_WEIGHT = 32 * 1024 * 1024
# Elements of the partial sums lora_add's expand kernel loads at once ([splits, rows, rank
# block]), and the warps of lora_add's launches. ptxas -v for sm_90 (Triton's compiler, no GPU):
# with 4 warps and 8192 elements a bf16 expand tile of 16 rows took 222-255 registers and spilled
# from rank 64 on; with 8 warps and 2048, 115-240 registers and no spill at 16 rows (decode) up
# to rank 128, none at 64 rows up to rank 16, and at 64 rows and rank 64 820 spilled bytes
# against lora_expand's 1376. The shrink of stacked partitions (rank tiles of 64: q, k and v at
# rank 16 are 48) spills at 4 warps (228 bytes at 16 rows), not at 8. Since the expand adds up the
# partial sums once per rank step for all of a tile's adapters: 113 registers at 16 rows and rank
# 16, 239 at 64 rows, and 16 spilled bytes at 16 rows and rank 64.
PARTIALS_BLOCK = 2048
ADD_WARPS = 8
# When linear_lora's shrink lets the projection launch beside it (a programmatic dependent launch):
# at its start (False), or once each of its programs has its products, before the partial sums are
# stored and added up (True). The projection's programs wait for the whole shrink before their
# epilogue, so a program done with its product early holds its multiprocessor slot until the
# shrink ends; and while the projection streams its weight, the shrink's own loads queue behind
# it (H100, lora-trace: the projection ran 4.3, 5.5 and 7.9 us longer than the skinny matmul with
# shrinks of 14.0, 16.3 and 19.7 us). Released late, the shrink reads alone and ends sooner, the
# projection starts later. benchmarks/kernels_gpu.py lora-trace times both.
RELEASE_AFTER_PRODUCTS = False


@triton.jit
def _next_slot(tile_slots, after):
    """The smallest slot of the tile above ``after``, or NO_SLOT when none is left."""
    return tl.min(tl.where(tile_slots > after, tile_slots, NO_SLOT), 0)


@triton.jit
def _add_slot_products(acc, tile_slots, in_rows, w_ptr, stride_ws, w_offsets, w_ok, k_start, k_end,
                       BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc [BLOCK_M, W] += in[row, k_start:k_end] @ w[slot of the row][:, k_start:k_end].T for every row of
    the tile, one product per distinct slot present; ``in_rows`` points at the rows, ``w_offsets``
    [W, 1] at the weight rows within a slot."""
    reduce = tl.arange(0, BLOCK_K)
    slot = _next_slot(tile_slots, -1)
    while slot < NO_SLOT:
        mine = (tile_slots == slot)[:, None]
        w_rows = w_ptr + slot.to(tl.int64) * stride_ws + w_offsets
        for k in range(k_start, k_end, BLOCK_K):
            cols = k + reduce
            k_ok = (cols < k_end)[None, :]
            x = tl.load(in_rows + cols[None, :], mask=mine & k_ok, other=0.0)
            w = tl.load(w_rows + cols[None, :], mask=w_ok[:, None] & k_ok, other=0.0)
            acc += tl.dot(x.to(w.dtype), tl.trans(w), input_precision=DOT_PRECISION)
        slot = _next_slot(tile_slots, slot)
    return acc


@triton.jit
def _lora_shrink_kernel(x_ptr, a_ptr, slots_ptr, out_ptr, sums_ptr, ticket_ptr, tokens, rank, in_features,
                        k_per_split, scale, stride_xt, stride_as, stride_ar, stride_os, stride_ot,
                        BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                        DOT_PRECISION: tl.constexpr, SUM_SPLITS: tl.constexpr, LAUNCH_DEPENDENTS: tl.constexpr,
                        RELEASE_LATE: tl.constexpr):
    """Grid: (token tiles, rank tiles, splits of the input features).
    out[split] = scale * x @ a[slot].T over the split's features. With ``SUM_SPLITS`` the last
    program of a tile to finish (a ticket counter per tile) also adds the tile's partial sums in
    split order into ``sums`` [T, rank] float32 (same strides as one split of ``out``).
    ``LAUNCH_DEPENDENTS``: the next launch, if made a programmatic dependent of this one, may start
    now, or (``RELEASE_LATE``: ``RELEASE_AFTER_PRODUCTS``) once the program has its products; it
    waits for this launch's results where it needs them."""
    if LAUNCH_DEPENDENTS and not RELEASE_LATE:
        gdc.gdc_launch_dependents()
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ranks = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    split = tl.program_id(2)
    row_ok = rows < tokens
    rank_ok = ranks < rank
    tile_slots = tl.load(slots_ptr + rows, mask=row_ok, other=-1).to(tl.int32)
    k_start = split * k_per_split
    acc = _add_slot_products(tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32), tile_slots,
                             x_ptr + rows[:, None].to(tl.int64) * stride_xt, a_ptr, stride_as,
                             ranks[:, None] * stride_ar, rank_ok, k_start,
                             tl.minimum(k_start + k_per_split, in_features), BLOCK_K, DOT_PRECISION)
    if LAUNCH_DEPENDENTS and RELEASE_LATE:
        gdc.gdc_launch_dependents()
    tile = rows[:, None] * stride_ot + ranks[None, :]
    tile_ok = row_ok[:, None] & rank_ok[None, :]
    tl.store(out_ptr + split * stride_os + tile, (acc * scale).to(out_ptr.dtype.element_ty), mask=tile_ok)
    if SUM_SPLITS:
        # Every thread's partial sums are stored before the ticket is taken (its release orders them).
        tl.debug_barrier()
        ticket = ticket_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
        if tl.atomic_add(ticket, 1, sem="acq_rel") == tl.num_programs(2) - 1:
            total = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            for part in range(tl.num_programs(2)):
                total += tl.load(out_ptr + part * stride_os + tile, mask=tile_ok, other=0.0, cache_modifier=".cg")
            tl.store(sums_ptr + tile, total, mask=tile_ok)
            tl.atomic_xchg(ticket, 0)  # ready for the next launch


@triton.jit
def _lora_expand_kernel(shrunk_ptr, b_ptr, slots_ptr, base_ptr, out_ptr, tokens, out_features, rank,
                        stride_st, stride_bs, stride_bo, stride_baset, stride_ot,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        DOT_PRECISION: tl.constexpr):
    """Grid: (token tiles, output feature tiles). out = base + shrunk @ b[slot].T."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < tokens
    col_ok = cols < out_features
    tile_ok = row_ok[:, None] & col_ok[None, :]
    tile_slots = tl.load(slots_ptr + rows, mask=row_ok, other=-1).to(tl.int32)
    base = tl.load(base_ptr + rows[:, None].to(tl.int64) * stride_baset + cols[None, :], mask=tile_ok, other=0.0)
    acc = _add_slot_products(base.to(tl.float32), tile_slots, shrunk_ptr + rows[:, None].to(tl.int64) * stride_st,
                             b_ptr, stride_bs, cols[:, None].to(tl.int64) * stride_bo, col_ok, 0, rank,
                             BLOCK_K, DOT_PRECISION)
    out = out_ptr + rows[:, None].to(tl.int64) * stride_ot + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit
def _partition(cols, end0, end1, end2):
    """Each column's partition of a fused projection: the number of ``end0..end2`` at or below it."""
    return (cols >= end0).to(tl.int32) + (cols >= end1).to(tl.int32) + (cols >= end2).to(tl.int32)


@triton.jit
def _partitioned_output_tile(rows, slots_ptr, y_ptr, tokens, out_features, end0, end1, end2, stride_yt,
                             BLOCK_N: tl.constexpr):
    """lora_add's output tile: its columns and their mask, the rows' slots, the elements to write
    (rows with an adapter), y's values there in float32, and each column's partition."""
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < tokens
    col_ok = cols < out_features
    tile_slots = tl.load(slots_ptr + rows, mask=row_ok, other=-1).to(tl.int32)
    tile_ok = (row_ok & (tile_slots >= 0))[:, None] & col_ok[None, :]
    acc = tl.load(y_ptr + rows[:, None].to(tl.int64) * stride_yt + cols[None, :], mask=tile_ok, other=0.0).to(tl.float32)
    return cols, col_ok, tile_slots, tile_ok, acc, _partition(cols, end0, end1, end2)


@triton.jit
def _rank_range(col_ok, part, rank):
    """The rank columns a tile's output columns read: those of every partition the tile spans."""
    return tl.min(tl.where(col_ok, part, NO_SLOT), 0) * rank, (tl.max(tl.where(col_ok, part, 0), 0) + 1) * rank


@triton.jit
def _adapter_columns(b_ptr, slot, cols, col_ok, part, ranks, rank, k_end, stride_bs, stride_bo, load_ok):
    """b[slot][cols, rank step] [BLOCK_N, BLOCK_K]: each column's own partition's rank slice, zeros for the
    other partitions' ranks, for ranks past ``k_end`` and where not ``load_ok``."""
    w_cols = cols[:, None].to(tl.int64) * stride_bo + (ranks % rank)[None, :]
    w_ok = col_ok[:, None] & ((ranks // rank)[None, :] == part[:, None]) & (ranks < k_end)[None, :]
    return tl.load(b_ptr + slot.to(tl.int64) * stride_bs + w_cols, mask=w_ok & load_ok, other=0.0)


@triton.jit
def _add_expanded_partials(acc, rows, cols, col_ok, tile_slots, part, partials_ptr, b_ptr, rank, splits, stride_ps,
                           stride_pt, stride_bs, stride_bo, first_w, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                           SPLIT_BLOCK: tl.constexpr, DOT_PRECISION: tl.constexpr, PRELOADED: tl.constexpr):
    """acc [BLOCK_M, BLOCK_N] += (sum of the shrink's partials) @ b[slot].T for each row's slot.

    ``partials`` [splits, T, n * rank] float32 are the shrink's partial sums over slices of the
    input features, for every partition stacked along the rank; a column of partition p takes rank
    columns p * rank to (p + 1) * rank. A tile's columns may span partitions (small projections):
    the reduction then covers each partition's rank slice, with b's columns of the other partitions
    masked to zero. ``PRELOADED``: ``first_w`` holds the tile's first rank step of its smallest slot
    (``_adapter_columns``), loaded by the caller before it had to wait for the partials."""
    k_start, k_end = _rank_range(col_ok, part, rank)
    first_slot = _next_slot(tile_slots, -1)
    reduce = tl.arange(0, BLOCK_K)
    split_block = tl.arange(0, SPLIT_BLOCK)
    row_partials = partials_ptr + rows[:, None].to(tl.int64) * stride_pt
    adapted = (tile_slots >= 0)[:, None]
    # Rank steps outside, adapters inside: the partial sums of a step are added up once for every
    # row of the tile, not once per adapter present. A row's products still arrive in rank order
    # (the other adapters' steps add exact zeros to it), so its sum is the same as one at a time.
    for k in range(k_start, k_end, BLOCK_K):
        ranks = k + reduce
        rank_ok = (ranks < k_end)[None, :]
        shrunk = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for first in range(0, splits, SPLIT_BLOCK):
            which = first + split_block
            ptrs = (row_partials + ranks[None, :])[None, :, :] + which[:, None, None].to(tl.int64) * stride_ps
            ok = (which < splits)[:, None, None] & (adapted & rank_ok)[None, :, :]
            shrunk += tl.sum(tl.load(ptrs, mask=ok, other=0.0), 0)
        slot = first_slot
        while slot < NO_SLOT:
            if PRELOADED:
                fresh = (k != k_start) | (slot != first_slot)
                w = tl.where(fresh, _adapter_columns(b_ptr, slot, cols, col_ok, part, ranks, rank, k_end, stride_bs,
                                                     stride_bo, fresh), first_w)
            else:
                w = _adapter_columns(b_ptr, slot, cols, col_ok, part, ranks, rank, k_end, stride_bs, stride_bo, True)
            mine = tl.where((tile_slots == slot)[:, None], shrunk, 0.0)
            acc += tl.dot(mine.to(w.dtype), tl.trans(w), input_precision=DOT_PRECISION)
            slot = _next_slot(tile_slots, slot)
    return acc


@triton.jit
def _lora_add_expand_kernel(partials_ptr, b_ptr, slots_ptr, y_ptr, tokens, out_features, rank, splits,
                            end0, end1, end2, stride_ps, stride_pt, stride_bs, stride_bo, stride_yt,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            SPLIT_BLOCK: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Grid: (token tiles, output feature tiles). y += (sum of the partials) @ b[slot].T, in place."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols, col_ok, tile_slots, tile_ok, acc, part = _partitioned_output_tile(
        rows, slots_ptr, y_ptr, tokens, out_features, end0, end1, end2, stride_yt, BLOCK_N)
    acc = _add_expanded_partials(acc, rows, cols, col_ok, tile_slots, part, partials_ptr, b_ptr, rank, splits,
                                 stride_ps, stride_pt, stride_bs, stride_bo, 0, BLOCK_M, BLOCK_K, SPLIT_BLOCK,
                                 DOT_PRECISION, False)
    # The tile's pointers again rather than kept through the loop: fewer registers held.
    y_tile = y_ptr + rows[:, None].to(tl.int64) * stride_yt + cols[None, :]
    tl.store(y_tile, acc.to(y_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit
def _linear_lora_kernel(x_ptr, w_ptr, bias_ptr, shrunk_ptr, b_ptr, slots_ptr, out_ptr, M, N, K, rank,
                        end0, end1, end2, stride_xm, stride_wn, stride_om, stride_st, stride_bs, stride_bo,
                        HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        LORA_BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr, AFTER_SHRINK: tl.constexpr):
    """Grid: (output feature tiles,). out = x @ W.T (+ bias) + shrunk @ b[slot].T for up to 16 rows
    (``shrunk`` [T, n * rank] float32, every partition's shrink): the skinny matmul's tile, the
    adapters' products added before it is written. ``AFTER_SHRINK``: launched as a programmatic
    dependent of the shrink, so the product runs beside it; the program waits for the shrink's
    launch to finish before it reads ``shrunk`` or writes anything."""
    rows = tl.arange(0, 16)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    # What the adapters' products read besides the shrink's sums (the rows' slots and the first
    # rank step of the smallest slot's b, all a decode tile of one adapter needs) is loaded before
    # the product: after it only the sums are waited for, not two more loads one after the other.
    tile_slots = tl.load(slots_ptr + rows, mask=rows < M, other=-1).to(tl.int32)
    part = _partition(cols, end0, end1, end2)
    k_start, k_end = _rank_range(col_ok, part, rank)
    first_slot = _next_slot(tile_slots, -1)
    first_w = _adapter_columns(b_ptr, first_slot, cols, col_ok, part, k_start + tl.arange(0, LORA_BLOCK_K), rank,
                               k_end, stride_bs, stride_bo, first_slot < NO_SLOT)
    acc = skinny_product(x_ptr, w_ptr, M, N, K, stride_xm, stride_wn, cols, BLOCK_N, BLOCK_K)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if AFTER_SHRINK:
        gdc.gdc_wait()
    acc = _add_expanded_partials(acc, rows, cols, col_ok, tile_slots, part, shrunk_ptr, b_ptr, rank, 1, 0,
                                 stride_st, stride_bs, stride_bo, first_w, 16, LORA_BLOCK_K, 1, DOT_PRECISION, True)
    out_ptrs = out_ptr + rows[:, None] * stride_om + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(rows[:, None] < M) & col_ok[None, :])


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _block_m(tokens: int) -> int:
    return 16 if tokens <= SMALL_STEP_TOKENS else 64


def _dot_width(n: int) -> int:
    # tl.dot needs every dimension >= 16 and a power of two; padded lanes are masked to zero.
    return max(16, triton.next_power_of_2(n))


def _dot_precision(dtype: torch.dtype) -> str:
    # float32 must not silently become TF32 in the matrix units.
    return "ieee" if dtype == torch.float32 else "tf32"


def shrink_splits(tokens: int, in_features: int, block_k: int) -> int:
    """How many slices the input features are cut into: enough programs to fill the GPU."""
    tiles = triton.cdiv(tokens, _block_m(tokens))
    target = DECODE_SHRINK_PROGRAMS if tokens <= DECODE_TOKENS else SHRINK_TARGET_PROGRAMS
    return max(1, min(target // tiles, triton.cdiv(in_features, block_k)))


def _shrink_partials(x: torch.Tensor, lora_a: torch.Tensor, slots: torch.Tensor, scale: float,
                     dtype: torch.dtype, num_warps: int = 4, summed: bool = False,
                     launch_dependents: bool = False) -> torch.Tensor:
    """[splits, T, r] partial sums of scale * x @ lora_a[slot].T over slices of the input features,
    in ``dtype`` (one launch; x and lora_a with unit last stride, T > 0). ``summed`` (float32):
    [1, T, r], the partial sums added up in split order by the launch's last programs.
    ``launch_dependents``: a programmatic dependent launch may follow (``dependent_launches``)."""
    tokens, in_features = x.shape
    rank = lora_a.shape[1]
    block_k = SHRINK_STEP_BYTES // x.element_size()
    splits = shrink_splits(tokens, in_features, block_k)
    k_per_split = triton.cdiv(triton.cdiv(in_features, block_k), splits) * block_k
    partials = torch.empty(splits, tokens, rank, dtype=dtype, device=x.device)
    sum_splits = summed and splits > 1
    sums = torch.empty(1, tokens, rank, dtype=dtype, device=x.device) if sum_splits else partials
    block_m, block_r = _block_m(tokens), min(SHRINK_MAX_BLOCK_R, _dot_width(rank))
    grid = (triton.cdiv(tokens, block_m), triton.cdiv(rank, block_r), splits)
    _lora_shrink_kernel[grid](
        x, lora_a, slots, partials, sums, tickets(x.device, grid[0] * grid[1]) if sum_splits else slots, tokens, rank,
        in_features, k_per_split, scale, x.stride(0), lora_a.stride(0), lora_a.stride(1), partials.stride(0),
        partials.stride(1), BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=block_k, DOT_PRECISION=_dot_precision(x.dtype),
        SUM_SPLITS=sum_splits, LAUNCH_DEPENDENTS=launch_dependents, RELEASE_LATE=RELEASE_AFTER_PRODUCTS,
        num_warps=num_warps)
    return sums[:1] if summed else partials


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, slots: torch.Tensor, scale: float) -> torch.Tensor:
    """x [T, in], lora_a [S, r, in], slots [T] -> [T, r] = scale * x @ lora_a[slot].T (0 where slot < 0)."""
    x, lora_a = _unit_last_stride(x), _unit_last_stride(lora_a)
    tokens, in_features = x.shape
    if not tokens:
        return torch.empty(0, lora_a.shape[1], dtype=x.dtype, device=x.device)
    # One slice writes the result itself; more write float32 partial sums, rounded once when added up.
    one_slice = shrink_splits(tokens, in_features, SHRINK_STEP_BYTES // x.element_size()) == 1
    partials = _shrink_partials(x, lora_a, slots, scale, x.dtype if one_slice else torch.float32)
    return partials[0] if one_slice else partials.sum(0).to(x.dtype)


def lora_expand(shrunk: torch.Tensor, lora_b: torch.Tensor, slots: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """shrunk [T, r], lora_b [S, out, r], base [T, out] -> base + shrunk @ lora_b[slot].T (base where slot < 0)."""
    shrunk, lora_b, base = _unit_last_stride(shrunk), _unit_last_stride(lora_b), _unit_last_stride(base)
    tokens, out_features = base.shape
    rank = lora_b.shape[2]
    out = torch.empty(tokens, out_features, dtype=base.dtype, device=base.device)
    if not tokens:
        return out
    block_m = _block_m(tokens)
    block_k = min(EXPAND_STEP_BYTES // lora_b.element_size(), _dot_width(rank))
    _lora_expand_kernel[(triton.cdiv(tokens, block_m), triton.cdiv(out_features, EXPAND_BLOCK_N))](
        shrunk, lora_b, slots, base, out, tokens, out_features, rank,
        shrunk.stride(0), lora_b.stride(0), lora_b.stride(1), base.stride(0), out.stride(0),
        BLOCK_M=block_m, BLOCK_N=EXPAND_BLOCK_N, BLOCK_K=block_k,
        DOT_PRECISION=_dot_precision(lora_b.dtype))
    return out


def lora_add(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, slots: torch.Tensor,
             slices: Sequence[int], scale: float) -> torch.Tensor:
    """y [T, out] += per partition i: (scale * x @ A_i[slot].T) @ B_i[slot].T, in place; returns y.
    lora_a [S, n * r, in] and lora_b [S, out, r] hold the ``n = len(slices)`` partitions (contract 1.5).
    One shrink and one expand launch for up to ``MAX_SLICES`` partitions (a single launch whose
    programs each computed the shrink they need took 2-8x longer on an H100 at 1-8 tokens:
    docs/lora.md)."""
    slices = _checked_slices("lora_add", y.shape[1], lora_a, lora_b, slices)
    if len(slices) > MAX_SLICES:
        rank, start = lora_b.shape[2], 0
        for first in range(0, len(slices), MAX_SLICES):
            group = slices[first:first + MAX_SLICES]
            end = start + sum(group)
            lora_add(y[:, start:end], x, lora_a[:, first * rank:(first + len(group)) * rank], lora_b[:, start:end],
                     slots, group, scale)
            start = end
        return y
    tokens, out_features = y.shape
    if not tokens:
        return y
    x, lora_a, lora_b = _unit_last_stride(x), _unit_last_stride(lora_a), _unit_last_stride(lora_b)
    target = _unit_last_stride(y)
    _two_launch_add(target, x, lora_a, lora_b, slots, _partition_ends(slices), scale)
    if target is not y:
        y.copy_(target)
    return y


def linear_lora(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, slots: torch.Tensor, slices: Sequence[int], scale: float, *,
                plan=nvidia.skinny_matmul) -> torch.Tensor:
    """The platform's ``linear_lora`` op (contract 1.14): ``linear(x, weight, bias)`` plus every
    token's adapter delta (``lora_add``'s arguments). Where ``linear`` takes the skinny kernel (up to
    16 rows of a 16-bit weight: decode steps), the shrink's launch and then the skinny matmul's,
    which adds the adapters' products to its tile before writing it, in float32, rounded once: one
    launch a projection fewer than ``linear`` and ``lora_add``, which the other steps run (and steps
    of 2-16 tokens on a weight of over ``FUSED_MAX_WEIGHT`` elements). ``plan`` as for ``linear``."""
    slices = _checked_slices("linear_lora", weight.shape[0], lora_a, lora_b, slices)
    tokens = x.shape[0]
    fused = tokens == 1 or weight.numel() <= FUSED_MAX_WEIGHT
    if not fused or not skinny_matmul.fits(x, weight) or len(slices) > MAX_SLICES or not tokens or x.dim() != 2:
        return lora_add(skinny_matmul.linear(x, weight, bias, plan=plan), x, lora_a, lora_b, slots, slices, scale)
    x, lora_a, lora_b = _unit_last_stride(x), _unit_last_stride(lora_a), _unit_last_stride(lora_b)
    out_features, in_features = weight.shape
    rank = lora_b.shape[2]
    # The shrink adds up its own partial sums: the projection's programs then read one [16, rank]
    # tile a rank step, and keep about the skinny kernel's registers (sm_90, 16 x 256 tiles: 56
    # against 146 when each program added eight splits at a time itself, one program fewer a
    # multiprocessor for a kernel that needs every load in flight it can get).
    after_shrink = dependent_launches(x.device)
    shrunk = _shrink_partials(x, lora_a, slots, scale, torch.float32, ADD_WARPS, summed=True,
                              launch_dependents=after_shrink)
    tiles = plan(out_features, in_features)
    # Written only after the program's wait for the shrink: this memory may have been the shrink's
    # partial sums, freed above while the shrink may still be running.
    out = torch.empty(tokens, out_features, dtype=x.dtype, device=x.device)
    _linear_lora_kernel[(triton.cdiv(out_features, tiles["block_n"]),)](
        x, weight, bias if bias is not None else weight, shrunk, lora_b, slots, out, tokens, out_features,
        in_features, rank, *_partition_ends(slices), x.stride(0), weight.stride(0), out.stride(0), shrunk.stride(1),
        lora_b.stride(0), lora_b.stride(1), HAS_BIAS=bias is not None, BLOCK_N=tiles["block_n"],
        BLOCK_K=tiles["block_k"], LORA_BLOCK_K=min(EXPAND_STEP_BYTES // lora_b.element_size(), _dot_width(rank)),
        DOT_PRECISION=_dot_precision(lora_b.dtype), AFTER_SHRINK=after_shrink, num_warps=tiles["num_warps"],
        num_stages=tiles["num_stages"], **launch_options(after_shrink))
    return out


def _checked_slices(op: str, out_features: int, lora_a: torch.Tensor, lora_b: torch.Tensor,
                    slices: Sequence[int]) -> list[int]:
    """``slices`` as ints, once the adapter tensors are seen to hold those partitions of an output of
    ``out_features`` (ValueError naming the shapes otherwise)."""
    slices = [int(width) for width in slices]
    rank = lora_b.shape[2]
    if lora_a.shape[1] != len(slices) * rank or lora_b.shape[1] != sum(slices) or out_features != sum(slices):
        raise ValueError(f"{op}: an output of {out_features} features, lora_a {list(lora_a.shape)} and lora_b "
                         f"{list(lora_b.shape)} do not hold partitions {slices} of rank {rank}")
    return slices


def _partition_ends(slices: list[int]) -> list[int]:
    """The expand kernels' ``end0..end2``: where each partition but the last ends, the output's width
    for the ones past the last partition."""
    ends = [sum(slices[:i + 1]) for i in range(len(slices) - 1)]
    return ends + [sum(slices)] * (MAX_SLICES - 1 - len(ends))


def _two_launch_add(target: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                    slots: torch.Tensor, ends: list[int], scale: float) -> None:
    tokens, out_features = target.shape
    rank = lora_b.shape[2]
    partials = _shrink_partials(x, lora_a, slots, scale, torch.float32, ADD_WARPS)
    block_m = _block_m(tokens)
    block_k = min(EXPAND_STEP_BYTES // lora_b.element_size(), _dot_width(rank))
    splits = partials.shape[0]
    split_block = min(triton.next_power_of_2(splits), max(1, PARTIALS_BLOCK // (block_m * block_k)))
    _lora_add_expand_kernel[(triton.cdiv(tokens, block_m), triton.cdiv(out_features, EXPAND_BLOCK_N))](
        partials, lora_b, slots, target, tokens, out_features, rank, splits, *ends,
        partials.stride(0), partials.stride(1), lora_b.stride(0), lora_b.stride(1), target.stride(0),
        BLOCK_M=block_m, BLOCK_N=EXPAND_BLOCK_N, BLOCK_K=block_k, SPLIT_BLOCK=split_block,
        DOT_PRECISION=_dot_precision(lora_b.dtype), num_warps=ADD_WARPS)
