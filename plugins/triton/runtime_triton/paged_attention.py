"""Triton kernels of the unified paged attention, and the functions that launch them.

One kernel serves every phase. A program owns one *query block* (up to ``BLOCK_M`` rows =
``block_q`` query tokens of one sequence x the ``group`` query heads that share one KV head)
and walks that sequence's keys ``TILE_N`` at a time through the block table, with the online
(flash) softmax. Packing a KV head's query heads into the rows means each K/V tile is read once
for the whole group: decode under GQA is one matrix product per tile, not ``group`` vector ones.

Programs find their sequence on the device (a binary search over ``query_start_loc``), so a
launch needs only host-known sizes (tokens, sequences): no device-to-host sync, and the same
launch can later be captured in a CUDA graph.

Split-K (flash-decoding): with few sequences and long contexts the grid above leaves most
multiprocessors idle, so the key range of each query block is cut into ``num_splits`` slices,
each program writes its partial (max, sum, weighted values) to a float32 workspace, and the last
of a query block's programs to finish (a ticket counter per block, ``tickets.py``) merges the
slices in slice order: one launch, and the same bits every run.

Cache layout is the contract's default, ``[2 (K, V), blocks, block_size, kv_heads, head_size]``;
every address goes through the cache's strides. The cache holds the model's dtype or, with
``--kv-cache-dtype fp8``, unscaled fp8 (e4m3 or e5m2): stores saturate to the format's range,
and the attention kernel widens each K/V tile to the query's dtype before its products.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from runtime.platform import KV_CACHE_DTYPES

from .dependent import as_dependent, dependent_launches, launch_options, wait_for_the_launch_before
from .tickets import tickets

FP8_DTYPES = frozenset(KV_CACHE_DTYPES.values())
LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)  # scores go through exp2


@triton.jit
def tanh(x):
    # From exp2, which every Triton backend and the interpreter have, of -2|x| so it never overflows.
    e = tl.exp2(tl.abs(x) * (-2.0 * LOG2E))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def store_kv_kernel(key_ptr, value_ptr, cache_ptr, slot_ptr,
                    num_kv_heads, head_size, block_size,
                    stride_kt, stride_kh, stride_vt, stride_vh,
                    stride_ckv, stride_cb, stride_co, stride_ch,
                    HEADS_PAD: tl.constexpr, HEAD_PAD: tl.constexpr, SATURATE: tl.constexpr,
                    DEPENDENT: tl.constexpr):
    """One program per new token: its K and V (all KV heads) into the cache slot it maps to.

    A negative slot (a padding token of a fixed-shape batch) writes nothing. ``SATURATE``
    (an fp8 cache's largest finite value, else 0) clamps K/V before the cast.
    ``DEPENDENT``: launched as a programmatic dependent of the launch before (``dependent.py``).
    """
    wait_for_the_launch_before(DEPENDENT)
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + token)
    heads = tl.arange(0, HEADS_PAD)[:, None]
    dims = tl.arange(0, HEAD_PAD)[None, :]
    mask = (heads < num_kv_heads) & (dims < head_size) & (slot >= 0)
    slot = tl.maximum(slot, 0)
    dest = cache_ptr + (slot // block_size) * stride_cb + (slot % block_size) * stride_co + heads * stride_ch + dims
    k = tl.load(key_ptr + token * stride_kt + heads * stride_kh + dims, mask=mask)
    v = tl.load(value_ptr + token * stride_vt + heads * stride_vh + dims, mask=mask)
    if SATURATE > 0:
        # An unscaled fp8 cache saturates what it cannot hold, as torch's e4m3 cast and vLLM do. Only
        # the native conversions (cvt .satfinite, compute capability 8.9+) saturate by themselves;
        # Triton's emulated e5m2 on older GPUs and its interpreter give inf or NaN (e4m3 has no inf),
        # which would poison every later step that reads the slot.
        k = tl.clamp(k.to(tl.float32), -SATURATE, SATURATE)
        v = tl.clamp(v.to(tl.float32), -SATURATE, SATURATE)
    tl.store(dest, k.to(cache_ptr.dtype.element_ty), mask=mask)
    tl.store(dest + stride_ckv, v.to(cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _attend_tile(q, m, l, acc, start, kv_hi, q_pos, table, kv_base, dims, dim_ok, block_size, scale, window, soft_cap,
                 stride_ckv, stride_cb, stride_co,
                 TILE_N: tl.constexpr, USE_WINDOW: tl.constexpr, USE_SOFT_CAP: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, MASKED: tl.constexpr):
    """One online-softmax step over keys [start, start + TILE_N): returns the new (m, l, acc).
    Without ``MASKED`` every key of the tile is visible to every row (a tile wholly below the
    causal diagonal and inside the range): no position masks, no predicated loads."""
    pos = start + tl.arange(0, TILE_N)
    if MASKED:
        pos_ok = pos < kv_hi
    else:
        pos_ok = tl.full([TILE_N], 1, tl.int1)
    block = tl.load(table + pos // block_size, mask=pos_ok, other=0).to(tl.int64)
    slot = block * stride_cb + (pos % block_size) * stride_co
    # An fp8 cache's values are exact in the query's dtype, so the products stay as accurate as
    # with a cache in the model dtype (for which this cast is no operation at all).
    k = tl.load(kv_base + slot[None, :] + dims[:, None], mask=pos_ok[None, :] & dim_ok[:, None],
                other=0.0).to(q.dtype)
    s = tl.dot(q, k, input_precision=DOT_PRECISION) * scale
    if USE_SOFT_CAP:
        s = soft_cap * tanh(s / soft_cap)
    if MASKED:
        visible = (pos[None, :] <= q_pos[:, None]) & pos_ok[None, :]
        if USE_WINDOW:
            visible = visible & (pos[None, :] > q_pos[:, None] - window)
        s = tl.where(visible, s, float("-inf"))
    # Masked and interior tiles must round a score alike (whether a query's tile is masked depends
    # on where its prompt was cut: --deterministic). Left to the compiler, ``s * LOG2E - m`` became
    # one FMA in interior tiles but a product, the mask's select and a subtraction in masked ones
    # (float32 scores an ulp apart on an H100), so the FMA is written out. The max of the scaled
    # scores is the scaled max: rounding is monotone.
    m_new = tl.maximum(m, tl.max(s, 1) * LOG2E)
    # A row that has seen no visible key yet keeps m = -inf; shift it by 0 instead of inf - inf.
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(tl.fma(s, LOG2E, -m_shift[:, None]))
    alpha = tl.exp2(m - m_shift)
    l = l * alpha + tl.sum(p, 1)
    v = tl.load(kv_base + stride_ckv + slot[:, None] + dims[None, :], mask=pos_ok[:, None] & dim_ok[None, :],
                other=0.0).to(q.dtype)
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l, acc


# Sizes that vary from step to step or model to model are not specialised on (Triton would
# compile a variant per value that is 1 or a multiple of 16): one compile serves them all.
@triton.jit(do_not_specialize=["num_seqs", "search_steps", "group", "block_q", "block_size", "window"])
def unified_attention_kernel(
        out_ptr, partial_ptr, stats_ptr, ticket_ptr,
        q_ptr, cache_ptr, block_table_ptr, seq_lens_ptr, query_start_ptr,
        num_seqs, search_steps, group, block_q, block_size,
        scale, window, soft_cap,
        stride_qt, stride_qh, stride_ot, stride_oh,
        stride_ckv, stride_cb, stride_co, stride_ch, stride_bt,
        HEAD: tl.constexpr, HEAD_PAD: tl.constexpr, BLOCK_M: tl.constexpr, TILE_N: tl.constexpr,
        USE_WINDOW: tl.constexpr, USE_SOFT_CAP: tl.constexpr, SPLIT: tl.constexpr,
        DOT_PRECISION: tl.constexpr, ALIGN_TILES: tl.constexpr = False, DEPENDENT: tl.constexpr = False):
    """Grid: (query blocks (an upper bound), kv heads, splits). See the module docstring.
    ``DEPENDENT``: launched as a programmatic dependent of a launch that only wrote the cache
    (``dependent.py``): the queries and the sequences' layout are read before waiting for it."""
    q_block = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)

    # Sequence i's query blocks are numbered from query_start[i] // block_q + i: monotone in i and
    # never overlapping, so the owner is the last sequence whose first number is <= q_block.
    lo = 0
    hi = num_seqs - 1
    for _ in range(search_steps):
        mid = (lo + hi + 1) // 2
        owns = tl.load(query_start_ptr + mid) // block_q + mid <= q_block
        lo = tl.where(owns, mid, lo)
        hi = tl.where(owns, hi, mid - 1)
    seq = lo

    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + seq)
    context = seq_len - q_len
    first_q = (q_block - (q_start // block_q + seq)) * block_q
    last_q = tl.minimum(first_q + block_q, q_len) - 1  # < first_q: past this sequence's tokens, nothing to do

    rows = tl.arange(0, BLOCK_M)
    q_tok = first_q + rows // group
    head = kv_head * group + rows % group
    row_ok = (rows < block_q * group) & (q_tok <= last_q)
    q_pos = context + q_tok
    dims = tl.arange(0, HEAD_PAD)
    if HEAD == HEAD_PAD:  # the common case: no feature masks, so loads stay 16 bytes wide
        dim_ok = tl.full([HEAD_PAD], 1, tl.int1)
    else:
        dim_ok = dims < HEAD
    token = (q_start + q_tok).to(tl.int64)
    q = tl.load(q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)

    # Keys this block can see: up to its last query's position; with a window, from the first
    # query's window start. Then this split's share of that range.
    kv_hi = tl.where(first_q <= last_q, context + last_q + 1, 0)
    kv_lo = 0
    if USE_WINDOW:
        kv_lo = tl.maximum(context + first_q - window + 1, 0)
        if ALIGN_TILES:
            # Tiles at multiples of TILE_N whatever the block's first query: a token's keys are then
            # summed in the same tiles in every chunk and batch (--deterministic; masks hide the extra keys).
            kv_lo = kv_lo // TILE_N * TILE_N
    if SPLIT:
        share = tl.cdiv(tl.cdiv(tl.maximum(kv_hi - kv_lo, 0), num_splits), TILE_N) * TILE_N
        kv_lo = kv_lo + split * share
        kv_hi = tl.minimum(kv_hi, kv_lo + share)

    wait_for_the_launch_before(DEPENDENT)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max, log2 domain
    l = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(score - m)
    acc = tl.zeros([BLOCK_M, HEAD_PAD], tl.float32)
    table = block_table_ptr + seq.to(tl.int64) * stride_bt
    kv_base = cache_ptr + kv_head * stride_ch
    # Whole tiles up to the block's first query position are visible to all its rows: they skip
    # the masks (all but the last tile of a decode, all below the diagonal of a prefill block).
    # A window hides keys from the left as well, so there every tile is masked.
    interior_hi = kv_lo
    if not USE_WINDOW:
        interior_hi = kv_lo + tl.maximum(tl.minimum(context + first_q + 1, kv_hi) - kv_lo, 0) // TILE_N * TILE_N
    for start in range(kv_lo, interior_hi, TILE_N):
        m, l, acc = _attend_tile(q, m, l, acc, start, kv_hi, q_pos, table, kv_base, dims, dim_ok, block_size, scale,
                                 window, soft_cap, stride_ckv, stride_cb, stride_co, TILE_N, USE_WINDOW, USE_SOFT_CAP,
                                 DOT_PRECISION, MASKED=False)
    for start in range(interior_hi, kv_hi, TILE_N):
        m, l, acc = _attend_tile(q, m, l, acc, start, kv_hi, q_pos, table, kv_base, dims, dim_ok, block_size, scale,
                                 window, soft_cap, stride_ckv, stride_cb, stride_co, TILE_N, USE_WINDOW, USE_SOFT_CAP,
                                 DOT_PRECISION, MASKED=True)

    if SPLIT:
        first = (token * (tl.num_programs(1) * group) + head) * num_splits  # the row's split 0
        tl.store(stats_ptr + (first + split) * 2, m, mask=row_ok)
        tl.store(stats_ptr + (first + split) * 2 + 1, l, mask=row_ok)
        tl.store(partial_ptr + (first + split)[:, None] * HEAD_PAD + dims[None, :], acc, mask=row_ok[:, None])
        # Every thread's partial sums are stored before the ticket is taken (its release orders them).
        tl.debug_barrier()
        ticket = ticket_ptr + q_block * tl.num_programs(1) + kv_head
        if tl.atomic_add(ticket, 1, sem="acq_rel") == num_splits - 1:
            _merge_splits(out_ptr, partial_ptr, stats_ptr, first, num_splits, token, head, row_ok, dims, dim_ok,
                          stride_ot, stride_oh, BLOCK_M, HEAD_PAD)
            tl.atomic_xchg(ticket, 0)  # ready for the next launch
    else:
        out = acc / tl.where(l == 0.0, 1.0, l)[:, None]
        tl.store(out_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


@triton.jit
def _merge_splits(out_ptr, partial_ptr, stats_ptr, first, num_splits, token, head, row_ok, dims, dim_ok, stride_ot,
                  stride_oh, BLOCK_M: tl.constexpr, HEAD_PAD: tl.constexpr):
    """Rows' splits (from ``first``) rescaled to their common max and added, in split order (read
    through L2: other programs wrote them)."""
    top = tl.full([BLOCK_M], float("-inf"), tl.float32)
    for part in range(num_splits):
        top = tl.maximum(top, tl.load(stats_ptr + (first + part) * 2, mask=row_ok, other=float("-inf"),
                                      cache_modifier=".cg"))
    top = tl.where(row_ok, top, 0.0)  # rows past the block's tokens: no -inf - -inf
    total = tl.zeros([BLOCK_M, HEAD_PAD], tl.float32)
    norm = tl.zeros([BLOCK_M], tl.float32)
    for part in range(num_splits):
        at = first + part
        # A split that saw no key has m = -inf: weight 0.
        weight = tl.exp2(tl.load(stats_ptr + at * 2, mask=row_ok, other=float("-inf"), cache_modifier=".cg") - top)
        norm += tl.load(stats_ptr + at * 2 + 1, mask=row_ok, other=0.0, cache_modifier=".cg") * weight
        total += tl.load(partial_ptr + at[:, None] * HEAD_PAD + dims[None, :], mask=row_ok[:, None], other=0.0,
                         cache_modifier=".cg") * weight[:, None]
    out = total / tl.where(norm == 0.0, 1.0, norm)[:, None]
    tl.store(out_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


def store_kv(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write key/value [T, Hkv, D] (any row and head strides) at ``slot_mapping`` [T] of the cache."""
    tokens, kv_heads, head_size = key.shape
    if tokens == 0:
        return
    key, value = _unit_last_stride(key), _unit_last_stride(value)
    store_kv_kernel[(tokens,)](
        key, value, kv_cache, slot_mapping, kv_heads, head_size, kv_cache.shape[2],
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        HEADS_PAD=triton.next_power_of_2(kv_heads), HEAD_PAD=triton.next_power_of_2(head_size),
        SATURATE=torch.finfo(kv_cache.dtype).max if kv_cache.dtype in FP8_DTYPES else 0.0,
        **as_dependent(key.device))


def unified_attention(query: torch.Tensor, kv_cache: torch.Tensor, out: torch.Tensor, query_start_loc: torch.Tensor,
                      seq_lens: torch.Tensor, block_table: torch.Tensor, num_seqs: int, *, scale: float,
                      sliding_window: int | None, soft_cap: float | None, block_m: int, tile_n: int,
                      num_splits: int = 1, workspace: tuple[torch.Tensor, torch.Tensor] | None = None,
                      num_warps: int = 4, num_stages: int = 2, align_tiles: bool = False,
                      after_cache_write: bool = False) -> torch.Tensor:
    """Attention of query [T, H, D] over the cache (its new K/V already stored) into ``out`` [T, H, D].

    ``block_m`` rows per program (a power of two >= 16 and >= the GQA group), ``tile_n`` keys per
    step; ``num_splits`` > 1 takes the split-K path with ``workspace`` from :func:`split_workspace`.
    ``align_tiles`` starts a sliding window's key tiles at multiples of ``tile_n`` (batch invariance).
    ``after_cache_write``: the launch just before this one wrote only the cache (:func:`store_kv`),
    so where launches may depend on the one before (``dependent.py``) the programs read the queries
    and the sequences' layout while it still runs.
    Every size comes from the host: nothing here waits for the device.
    """
    tokens, num_heads, head_size = query.shape
    kv_heads = kv_cache.shape[3]
    group = num_heads // kv_heads
    block_q = block_m // group
    head_pad = padded_head_size(head_size)
    # A copy of the queries made here would be the launch just before, and they are read before the wait.
    early = after_cache_write and dependent_launches(query.device) and query.stride(-1) == 1
    query = _unit_last_stride(query)
    split = num_splits > 1
    partial, stats = workspace if split else (out, out)
    grid = (tokens // block_q + num_seqs, kv_heads, num_splits)
    counters = tickets(query.device, grid[0] * grid[1]) if split else out
    unified_attention_kernel[grid](
        out, partial, stats, counters, query, kv_cache, block_table, seq_lens, query_start_loc,
        num_seqs, num_seqs.bit_length(), group, block_q, kv_cache.shape[2],
        scale, sliding_window or 0, soft_cap or 0.0,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3), block_table.stride(0),
        HEAD=head_size, HEAD_PAD=head_pad, BLOCK_M=block_m, TILE_N=tile_n,
        USE_WINDOW=sliding_window is not None, USE_SOFT_CAP=soft_cap is not None, SPLIT=split,
        # float32 must not silently become TF32 in the matrix units.
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32", ALIGN_TILES=align_tiles,
        DEPENDENT=early, num_warps=num_warps, num_stages=num_stages, **launch_options(early))
    return out


def split_workspace(tokens: int, num_heads: int, head_size: int, num_splits: int,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (partial sums [T, H, splits, D_pad], (max, sum) [T, H, splits, 2]) for the split-K path."""
    partial = torch.empty(tokens, num_heads, num_splits, padded_head_size(head_size), dtype=torch.float32, device=device)
    stats = torch.empty(tokens, num_heads, num_splits, 2, dtype=torch.float32, device=device)
    return partial, stats


def padded_head_size(head_size: int) -> int:
    # tl.dot needs every dimension >= 16 and a power of two; padded lanes are masked to zero.
    return max(16, triton.next_power_of_2(head_size))


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """The kernels take any outer strides but need each head's features contiguous."""
    return t if t.stride(-1) == 1 else t.contiguous()
