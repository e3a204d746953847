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
split (``SHRINK_TARGET_PROGRAMS``) into float32 partial sums that one ``sum`` adds up. Math is
float32 with one rounding to the output dtype, like the reference; float32 inputs multiply as
IEEE float32, never TF32.

Tile sizes are a first plan: the kernels compile for sm_86 and sm_90 within 64 KiB of shared
memory (Triton's ahead-of-time compiler, no GPU) and pass their tests under the interpreter, but
have not run or been timed on a GPU yet.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

NO_SLOT: tl.constexpr = tl.constexpr(2 ** 31 - 1)
# Decode-sized steps use the smallest tile tl.dot takes, so a tile mixes as few adapters as possible.
SMALL_STEP_TOKENS = 256
# About one program per multiprocessor of an H100/H200 (132).
SHRINK_TARGET_PROGRAMS = 128
# Bytes of each row a program reads per reduction step: 128 bf16/fp16 or 64 float32 features for
# shrink, so a float32 tile takes the shared memory of a 16-bit one (128 float32 features at rank
# 64 would take 128 KiB, more than an A10 or RTX 30xx has).
SHRINK_STEP_BYTES = 256
EXPAND_STEP_BYTES = 128
EXPAND_BLOCK_N = 128
# Ranks past this (256 and 512 adapters exist) take more programs, not larger tiles.
SHRINK_MAX_BLOCK_R = 64


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
def _lora_shrink_kernel(x_ptr, a_ptr, slots_ptr, out_ptr, tokens, rank, in_features, k_per_split, scale,
                        stride_xt, stride_as, stride_ar, stride_os, stride_ot,
                        BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                        DOT_PRECISION: tl.constexpr):
    """Grid: (token tiles, rank tiles, splits of the input features).
    out[split] = scale * x @ a[slot].T over the split's features."""
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
    out = out_ptr + split * stride_os + rows[:, None] * stride_ot + ranks[None, :]
    tl.store(out, (acc * scale).to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & rank_ok[None, :])


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
    return max(1, min(SHRINK_TARGET_PROGRAMS // tiles, triton.cdiv(in_features, block_k)))


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, slots: torch.Tensor, scale: float) -> torch.Tensor:
    """x [T, in], lora_a [S, r, in], slots [T] -> [T, r] = scale * x @ lora_a[slot].T (0 where slot < 0)."""
    x, lora_a = _unit_last_stride(x), _unit_last_stride(lora_a)
    tokens, in_features = x.shape
    rank = lora_a.shape[1]
    if not tokens:
        return torch.empty(0, rank, dtype=x.dtype, device=x.device)
    block_k = SHRINK_STEP_BYTES // x.element_size()
    splits = shrink_splits(tokens, in_features, block_k)
    k_per_split = triton.cdiv(triton.cdiv(in_features, block_k), splits) * block_k
    # One slice writes the result itself; more write float32 partial sums, rounded once when added up.
    partials = torch.empty(splits, tokens, rank, dtype=x.dtype if splits == 1 else torch.float32, device=x.device)
    block_m, block_r = _block_m(tokens), min(SHRINK_MAX_BLOCK_R, _dot_width(rank))
    _lora_shrink_kernel[(triton.cdiv(tokens, block_m), triton.cdiv(rank, block_r), splits)](
        x, lora_a, slots, partials, tokens, rank, in_features, k_per_split, scale,
        x.stride(0), lora_a.stride(0), lora_a.stride(1), partials.stride(0), partials.stride(1),
        BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=block_k, DOT_PRECISION=_dot_precision(x.dtype))
    return partials[0] if splits == 1 else partials.sum(0).to(x.dtype)


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
