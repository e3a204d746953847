"""``fused_moe`` (contract 1.6) as two Triton grouped GEMMs over token/expert pairs sorted by expert.

Routing is the reference's (softmax in float32, the top k, optional renormalisation), one program
a token (``route``). The pairs are then sorted by expert and each expert's run padded to a
multiple of ``BLOCK_M`` (``align_pairs``: a count and a placing launch; sized from the shapes
alone), so every block of ``BLOCK_M`` sorted rows belongs to one expert. A decode step's routing
and sort are one program, one launch (``route_and_sort``). Two launches follow:

- gate/up: a program owns one block of rows and ``BLOCK_N`` columns of the intermediate width; it
  gathers its rows' tokens from ``x``, multiplies them by the same columns of its expert's gate
  and up weights in one pass over the hidden size, and writes ``act(gate) * up`` for its rows.
- down: a program owns one block of those rows and ``BLOCK_N`` hidden columns; it multiplies by
  its expert's down weights and writes each row, rounded to the activations' dtype, at its pair.

A last launch sums each token's k pairs, each times its routing weight, in routing order in float32
and rounds the sum once (``_combine_kernel``): the pairs cross memory in the activations' 16 bits,
not as weighted float32 rows (at Qwen3-30B-A3B's 8 pairs a token those were 4x the layer's output). Blocks past the last expert's (the launches are sized for the worst
padding) return at once, so nothing is read back on the host and the op is captured in CUDA graphs. float8 expert weights (``Fp8Method.quantize_experts``) are read as
they are stored, widened to the activations' dtype in registers, and their per-channel scales
applied to the products: the weights cross memory at one byte each.

Math is float32; like the reference, the gate/up products are rounded to the input dtype before
the activation, the activation and the down products once each, and the weighted sum once.
float32 inputs multiply as IEEE float32, never TF32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

SMALL_PAIRS = 64
"""Up to this many token/expert pairs one program sorts them (a decode step's sort in one launch)."""


@dataclass(frozen=True)
class MoEPlan:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# From benchmarks/kernels_gpu.py moe-sweep on one Mixtral-8x7B layer (H100, 2026-12-06): at 1-32
# tokens the gate/up launch is fastest at 32 columns (4 or 8 warps alike), the down launch at 64
# (256.2 against 269.6 us at one token); at 256 tokens 64-row blocks were best at 64 x 64 (gate/up)
# and 64 x 128 (down), 128 x 128 tiles better still (1.11 against 1.19 ms for 64 x 64 in both);
# at 2048 tokens 128 x 128 took 3.64 ms, 64 x 64 5.61. The same sweep on a Qwen3-30B-A3B layer
# (128 experts of 2048 x 768, H100, 2026-12-06, docs/cuda-results/h100-2026-12-06-e) put 4-warp
# 16-row plans first at every size up to 256 tokens: both launches with them 450 us at 256 tokens
# against 536 with 8 warps, 41.7 against 46.1 at one; on Mixtral 4 warps led too, by under 1%.
DECODE_PLANS = (MoEPlan(block_m=16, block_n=32, block_k=256, num_warps=4, num_stages=4),
                MoEPlan(block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=4))
MIDDLE_PLANS = (MoEPlan(block_m=64, block_n=64, block_k=64, num_warps=4, num_stages=4),
                MoEPlan(block_m=64, block_n=128, block_k=64, num_warps=8, num_stages=4))
PREFILL_PLANS = (MoEPlan(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3),) * 2


def plans_for(pairs: int, experts: int, dtype: torch.dtype) -> tuple[MoEPlan, MoEPlan]:
    """The (gate/up, down) tile plans for ``pairs`` token/expert pairs over ``experts``.

    Chosen by the pairs an expert gets on average, not by the pairs alone: every expert's run is
    padded to a whole block, so 128-row blocks over 128 experts of 16 pairs each would multiply
    eight times as many rows as there are (Qwen3-30B-A3B at 256 tokens)."""
    per_expert = pairs / experts
    plans = DECODE_PLANS if per_expert <= 16 else MIDDLE_PLANS if per_expert < 64 else PREFILL_PLANS
    if dtype == torch.float32:  # the same shared memory per stage as a 16-bit tile
        plans = tuple(MoEPlan(p.block_m, p.block_n, p.block_k // 2, p.num_warps, p.num_stages) for p in plans)
    return plans


def sorted_rows(pairs: int, experts: int, block_m: int) -> int:
    """The most sorted rows any routing of ``pairs`` pairs over ``experts`` needs: each used
    expert's run padded to whole blocks is at most ``cdiv(pairs, block_m) + experts`` blocks, and
    never more blocks than pairs (a used block holds at least one). The launches are sized by it,
    so a decode step over many experts starts a few programs, not one per expert's block."""
    return min(pairs, triton.cdiv(pairs + experts * (block_m - 1), block_m)) * block_m


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool,
          expert_map: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``runtime.platform.reference.select_experts`` in one launch: router_logits [T, E] ->
    (weights [T, k] float32, ids [T, k] int32, -1 for another rank's expert), largest first.
    (The torch ops take five to seven launches a layer, each longer than this whole kernel at a
    decode step.)"""
    tokens, experts = router_logits.shape
    router_logits = router_logits if router_logits.stride(-1) == 1 else router_logits.contiguous()
    weights = torch.empty(tokens, top_k, dtype=torch.float32, device=router_logits.device)
    ids = torch.empty(tokens, top_k, dtype=torch.int32, device=router_logits.device)
    if tokens:
        _route_kernel[(tokens,)](router_logits, weights, ids, expert_map if expert_map is not None else ids,
                                 experts, router_logits.stride(0), TOP_K=top_k, RENORMALIZE=renormalize,
                                 HAS_MAP=expert_map is not None, BLOCK_E=triton.next_power_of_2(experts),
                                 BLOCK_K=triton.next_power_of_2(top_k), num_warps=1 if experts <= 64 else 4)
    return weights, ids


@triton.jit
def _route_kernel(logits_ptr, weights_ptr, ids_ptr, expert_map_ptr, experts, stride_t, TOP_K: tl.constexpr,
                  RENORMALIZE: tl.constexpr, HAS_MAP: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    token = tl.program_id(0) + tl.arange(0, 1)
    _route_tokens(logits_ptr, weights_ptr, ids_ptr, expert_map_ptr, token, token >= 0, experts, stride_t, TOP_K,
                  RENORMALIZE, HAS_MAP, 1, BLOCK_E, BLOCK_K)


@triton.jit
def _route_tokens(logits_ptr, weights_ptr, ids_ptr, expert_map_ptr, token, token_ok, experts, stride_t,
                  TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr, HAS_MAP: tl.constexpr, BLOCK_T: tl.constexpr,
                  BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    """Tokens ``token`` [BLOCK_T] (those not ``token_ok`` left alone): each one's softmax, then k
    times the largest probability left (the lowest expert among equals), each one's expert taken
    out of the running. Stores their weights and ids, and returns the ids [BLOCK_T, BLOCK_K]."""
    e = tl.arange(0, BLOCK_E)
    rows = token.to(tl.int64)
    logits = tl.load(logits_ptr + rows[:, None] * stride_t + e[None, :],
                     mask=token_ok[:, None] & (e < experts)[None, :], other=float("-inf")).to(tl.float32)
    logits = tl.where(token_ok[:, None], logits, 0.0)  # rows of no token: finite, never stored
    exps = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    left = tl.where((e < experts)[None, :], exps / tl.sum(exps, axis=1)[:, None], -1.0)
    slot = tl.arange(0, BLOCK_K)
    chosen_weights = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    chosen_ids = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int32)
    for i in tl.static_range(TOP_K):
        weight = tl.max(left, axis=1)
        expert = tl.min(tl.where(left == weight[:, None], e[None, :], BLOCK_E), axis=1)
        chosen_weights = tl.where(slot[None, :] == i, weight[:, None], chosen_weights)
        chosen_ids = tl.where(slot[None, :] == i, expert[:, None], chosen_ids)
        left = tl.where(e[None, :] == expert[:, None], -1.0, left)
    if RENORMALIZE:
        chosen_weights = chosen_weights / tl.sum(tl.where(slot[None, :] < TOP_K, chosen_weights, 0.0), axis=1)[:, None]
    chosen = token_ok[:, None] & (slot < TOP_K)[None, :]
    if HAS_MAP:
        chosen_ids = tl.load(expert_map_ptr + chosen_ids, mask=chosen, other=0).to(tl.int32)
    pair = rows[:, None] * TOP_K + slot[None, :]
    tl.store(weights_ptr + pair, chosen_weights, mask=chosen)
    tl.store(ids_ptr + pair, chosen_ids, mask=chosen)
    return chosen_ids


def align_pairs(ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [T, k] (stacked expert per pair, -1: another rank's) -> (sorted_pairs [capacity] int32:
    the pair at each sorted row, ``T * k`` for padding; block_expert [capacity / block_m] int32:
    each block's expert, ``num_experts`` past the last used block).

    Expert e's pairs occupy rows from its padded start on; each expert's run is padded to a
    multiple of ``block_m``. ``capacity`` is :func:`sorted_rows`. Two launches (a count, then the
    placing) put each expert's pairs in whatever order the count's atomics reach its counter: every
    row is computed on its own, so the op's result does not depend on that order. (In torch ops a
    sort takes about 20 small kernels a layer, longer than some of a decode step's expert products;
    a decode step's sort is :func:`route_and_sort`'s one program, in pair order.)
    """
    pairs = ids.numel()
    capacity = sorted_rows(pairs, num_experts, block_m)
    blocks = capacity // block_m
    block_e = max(16, triton.next_power_of_2(num_experts + 1))
    flat = ids.flatten().contiguous()
    counts = torch.zeros(num_experts + 1, dtype=torch.int32, device=ids.device)
    ranks = torch.empty(pairs, dtype=torch.int32, device=ids.device)
    sorted_pairs = torch.full((capacity,), pairs, dtype=torch.int32, device=ids.device)
    block_expert = torch.empty(blocks, dtype=torch.int32, device=ids.device)
    if pairs:
        _count_kernel[(triton.cdiv(pairs, COUNT_BLOCK),)](flat, counts, ranks, pairs, num_experts, BLOCK=COUNT_BLOCK)
    place_block = max(16, min(64, PLACE_ELEMENTS // block_e))
    if max(pairs, blocks):
        _place_kernel[(triton.cdiv(max(pairs, blocks), place_block),)](
            flat, counts, ranks, sorted_pairs, block_expert, pairs, num_experts, blocks,
            BLOCK_M=block_m, BLOCK_E=block_e, BLOCK=place_block, num_warps=4)
    return sorted_pairs, block_expert


ROUTE_SORT_ELEMENTS = 20480
"""The one-program routing and sort holds a [pairs, experts] table and a [tokens, experts] one:
compiled for sm_90, up to this many elements of both fit 4 warps' registers without a spill (8
tokens of top-8 over 128 experts: 242 registers; 64 tokens of top-1 over 128 spill at 4 warps),
up to twice as many 8 warps' (8 of top-8 over 256 experts: 206); beyond, routing and sort are
launched apart (10 tokens of top-6 over 256 experts spilled 1.5 KB at 4 warps)."""


def route_and_sort(router_logits: torch.Tensor, top_k: int, renormalize: bool, num_experts: int, block_m: int,
                   expert_map: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """:func:`route`, then :func:`align_pairs` over ``num_experts`` (this rank's) on its ids:
    (weights, ids, sorted_pairs, block_expert). Up to ``SMALL_PAIRS`` pairs (a decode step) one
    program does both, one launch a layer instead of two, where its tables fit (``ROUTE_SORT_ELEMENTS``)."""
    tokens, experts = router_logits.shape
    pairs = tokens * top_k
    block_t, block_k = triton.next_power_of_2(tokens), triton.next_power_of_2(top_k)
    block_e, block_s = triton.next_power_of_2(experts), max(16, triton.next_power_of_2(num_experts + 1))
    elements = block_t * block_k * block_s + block_t * block_e
    if pairs > SMALL_PAIRS or tokens == 0 or elements > 2 * ROUTE_SORT_ELEMENTS:
        weights, ids = route(router_logits, top_k, renormalize, expert_map)
        return weights, ids, *align_pairs(ids, num_experts, block_m)
    router_logits = router_logits if router_logits.stride(-1) == 1 else router_logits.contiguous()
    device = router_logits.device
    weights = torch.empty(tokens, top_k, dtype=torch.float32, device=device)
    ids = torch.empty(tokens, top_k, dtype=torch.int32, device=device)
    capacity = sorted_rows(pairs, num_experts, block_m)
    sorted_pairs = torch.empty(capacity, dtype=torch.int32, device=device)
    block_expert = torch.empty(capacity // block_m, dtype=torch.int32, device=device)
    block_r = max(16, min(ALIGN_ELEMENTS // (block_t * block_k), triton.next_power_of_2(capacity)))
    _route_sort_small_kernel[(1,)](
        router_logits, weights, ids, expert_map if expert_map is not None else ids, sorted_pairs, block_expert, tokens,
        experts, num_experts, router_logits.stride(0), capacity, capacity // block_m, TOP_K=top_k,
        RENORMALIZE=renormalize, HAS_MAP=expert_map is not None, BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_K=block_k,
        BLOCK_M=block_m, BLOCK_S=block_s, BLOCK_R=block_r, num_warps=4 if elements <= ROUTE_SORT_ELEMENTS else 8)
    return weights, ids, sorted_pairs, block_expert


COUNT_BLOCK = 1024
PLACE_ELEMENTS = 8192
"""A placing program takes up to 64 pairs (and blocks), fewer over many experts: its [pairs,
experts] comparison table stays within this many elements (16 pairs at 257-512 experts)."""


@triton.jit
def _count_kernel(ids_ptr, counts_ptr, ranks_ptr, pairs, num_experts, BLOCK: tl.constexpr):
    """Each pair's rank among its expert's pairs: the count before it adds itself (another rank's
    expert counts in the slot past the last)."""
    p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = p < pairs
    ids = tl.load(ids_ptr + p, mask=valid, other=0).to(tl.int32)
    ids = tl.where(ids < 0, num_experts, ids)
    # Relaxed: a rank needs only the count's atomicity; the default (acq_rel) fences every add.
    tl.store(ranks_ptr + p, tl.atomic_add(counts_ptr + ids, 1, mask=valid, sem="relaxed"), mask=valid)


@triton.jit
def _place_kernel(ids_ptr, counts_ptr, ranks_ptr, sorted_ptr, block_expert_ptr, pairs, num_experts, blocks,
                  BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK: tl.constexpr):
    """Every program sums the padded counts into each expert's first row itself, then writes its
    pairs at their rows (one pair a row: no two threads write one address) and its blocks' experts."""
    e = tl.arange(0, BLOCK_E)
    counts = tl.load(counts_ptr + e, mask=e < num_experts, other=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = p < pairs
    ids = tl.load(ids_ptr + p, mask=valid, other=0).to(tl.int32)
    placed = valid & (ids >= 0)
    row = tl.gather(ends - padded, tl.where(placed, ids, 0), 0) + tl.load(ranks_ptr + p, mask=placed, other=0)
    tl.store(sorted_ptr + row, p, mask=placed)
    block = p
    before = (ends[None, :] <= (block * BLOCK_M)[:, None]) & (e[None, :] < num_experts)
    tl.store(block_expert_ptr + block, tl.sum(before.to(tl.int32), axis=1), mask=block < blocks)


# The one-program sort matches this many (sorted row, pair) candidates at a time: compiled for
# sm_90, 64 pairs of 128 experts then use 164 registers and spill nothing (256 rows at a time: 255
# and a spill).
ALIGN_ELEMENTS = 4096


@triton.jit
def _route_sort_small_kernel(logits_ptr, weights_ptr, ids_ptr, expert_map_ptr, sorted_ptr, block_expert_ptr, tokens,
                             experts, num_experts, stride_t, capacity, blocks, TOP_K: tl.constexpr,
                             RENORMALIZE: tl.constexpr, HAS_MAP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
                             BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr,
                             BLOCK_R: tl.constexpr):
    """A decode step's routing and sort in one program (one launch fewer a layer than route, then
    align_pairs): every token's experts, then those pairs placed by _sort_small (over this rank's
    ``num_experts``, ``BLOCK_S`` wide: one more for another rank's)."""
    token = tl.arange(0, BLOCK_T)
    token_ok = token < tokens
    ids = _route_tokens(logits_ptr, weights_ptr, ids_ptr, expert_map_ptr, token, token_ok, experts, stride_t, TOP_K,
                        RENORMALIZE, HAS_MAP, BLOCK_T, BLOCK_E, BLOCK_K)
    slot = tl.arange(0, BLOCK_K)
    pair = tl.reshape(token[:, None] * TOP_K + slot[None, :], (BLOCK_T * BLOCK_K,))
    valid = tl.reshape(token_ok[:, None] & (slot < TOP_K)[None, :], (BLOCK_T * BLOCK_K,))
    _sort_small(tl.reshape(ids, (BLOCK_T * BLOCK_K,)), pair, valid, sorted_ptr, block_expert_ptr, tokens * TOP_K,
                num_experts, capacity, blocks, BLOCK_M, BLOCK_S, BLOCK_R)


@triton.jit
def _sort_small(ids, pair, valid, sorted_ptr, block_expert_ptr, pairs, num_experts, capacity, blocks,
                BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_R: tl.constexpr):
    """align_pairs in one program for the pairs ``pair`` (in pair order; ``valid`` marks real ones)
    of experts ``ids``: each pair's rank among its expert's pairs from a running count over a
    one-hot [pairs, experts] table, each expert's padded start from a running sum of the padded
    counts; every sorted row then looks up the pair that lands on it (no scatter, so no two threads
    write one address)."""
    e = tl.arange(0, BLOCK_E)
    ids = tl.where(ids < 0, num_experts, ids)  # another rank's expert: counted past the last, never placed
    onehot = ((ids[:, None] == e[None, :]) & valid[:, None]).to(tl.int32)
    rank = tl.sum(tl.cumsum(onehot, axis=0) * onehot, axis=1) - 1
    counts = tl.sum(onehot, axis=0)
    padded = tl.where(e < num_experts, (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M, 0)
    ends = tl.cumsum(padded, axis=0)
    row = tl.sum(onehot * (ends - padded)[None, :], axis=1) + rank
    row = tl.where(valid & (ids < num_experts), row, capacity)
    for first in range(0, capacity, BLOCK_R):
        rows = first + tl.arange(0, BLOCK_R)
        lands = row[None, :] == rows[:, None]
        landed = tl.sum(tl.where(lands, pair[None, :], 0), axis=1)
        found = tl.sum(lands.to(tl.int32), axis=1) > 0
        tl.store(sorted_ptr + rows, tl.where(found, landed, pairs), mask=rows < capacity)
    for first in range(0, blocks, BLOCK_R):
        block = first + tl.arange(0, BLOCK_R)
        before = (ends[None, :] <= (block * BLOCK_M)[:, None]) & (e[None, :] < num_experts)
        tl.store(block_expert_ptr + block, tl.sum(before.to(tl.int32), axis=1), mask=block < blocks)


@triton.jit
def _activate(gate, up, ACTIVATION: tl.constexpr):
    if ACTIVATION == "silu":
        act = gate * tl.sigmoid(gate)
    elif ACTIVATION == "gelu":
        act = 0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476))
    else:
        inner = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
        act = 0.5 * gate * (2.0 * tl.sigmoid(2.0 * inner))  # 1 + tanh(z) = 2 * sigmoid(2z)
    return act * up


@triton.jit
def _gate_up_kernel(x_ptr, w_ptr, scale_ptr, out_ptr, sorted_pairs_ptr, block_expert_ptr,
                    num_pairs, num_experts, width, hidden, top_k,
                    stride_xm, stride_we, stride_wn, stride_se, stride_om,
                    HAS_SCALE: tl.constexpr, ACTIVATION: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[row, n] = act(x[token] @ gate[e, n]) * (x[token] @ up[e, n]) for the block's sorted rows."""
    block = tl.program_id(0)
    expert = tl.load(block_expert_ptr + block).to(tl.int64)
    if expert >= num_experts:
        return
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_pairs_ptr + rows)
    row_ok = pairs < num_pairs
    tokens = (pairs // top_k).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < width
    ks = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + tokens * stride_xm
    gate_rows = w_ptr + expert * stride_we + cols.to(tl.int64) * stride_wn
    up_rows = gate_rows + width * stride_wn
    # Each tile's addresses are made inside the loop from one address a row: with loop-carried
    # [BLOCK, BLOCK_K] tensors of 64-bit addresses, compiled for sm_90, the 128 x 128 prefill
    # tiles' loop was 1,459 instructions of which 501 register spills and fills, the 64 x 64
    # tiles' 1,420 with 449; now 625 with 130, and 661 with 84.
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, hidden, BLOCK_K):
        k_ok = ks[None, :] < hidden - k
        x = tl.load(x_rows[:, None] + (k + ks)[None, :], mask=row_ok[:, None] & k_ok, other=0.0)
        w_gate = tl.load(gate_rows[:, None] + (k + ks)[None, :], mask=col_ok[:, None] & k_ok, other=0.0).to(x.dtype)
        w_up = tl.load(up_rows[:, None] + (k + ks)[None, :], mask=col_ok[:, None] & k_ok, other=0.0).to(x.dtype)
        acc_gate += tl.dot(x, tl.trans(w_gate), input_precision=DOT_PRECISION)
        acc_up += tl.dot(x, tl.trans(w_up), input_precision=DOT_PRECISION)
    if HAS_SCALE:
        scales = scale_ptr + expert * stride_se + cols
        acc_gate *= tl.load(scales, mask=col_ok, other=0.0)[None, :]
        acc_up *= tl.load(scales + width, mask=col_ok, other=0.0)[None, :]
    ty = out_ptr.dtype.element_ty
    act = _activate(acc_gate.to(ty).to(tl.float32), acc_up.to(ty).to(tl.float32), ACTIVATION)
    out_ptrs = out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :]
    tl.store(out_ptrs, act.to(ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _down_kernel(a_ptr, w_ptr, scale_ptr, out_ptr, sorted_pairs_ptr, block_expert_ptr,
                 num_pairs, num_experts, hidden, width,
                 stride_am, stride_we, stride_wn, stride_se, stride_om,
                 HAS_SCALE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[pair, n] = a[row] @ down[e, n] (rounded to out's dtype) for the block's sorted rows."""
    block = tl.program_id(0)
    expert = tl.load(block_expert_ptr + block).to(tl.int64)
    if expert >= num_experts:
        return
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_pairs_ptr + rows)
    row_ok = pairs < num_pairs
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < hidden
    ks = tl.arange(0, BLOCK_K)
    a_rows = a_ptr + rows.to(tl.int64) * stride_am
    w_rows = w_ptr + expert * stride_we + cols.to(tl.int64) * stride_wn
    a_ptrs = a_rows[:, None] + ks[None, :]
    w_ptrs = w_rows[:, None] + ks[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, width, BLOCK_K):
        k_ok = ks[None, :] < width - k
        # Decode tiles (16 rows) carry their address tensors across the loop; wider tiles make
        # them inside it from one address a row, as _gate_up_kernel does. Compiled for sm_90
        # (Triton 3.6): the 64 x 128 loop 423 -> 281 instructions, the 128 x 128 loop 612 -> 419,
        # while the 16 x 64 decode tile would take 249 registers instead of 128 (half the
        # programs a multiprocessor, fewer weight bytes in flight).
        if BLOCK_M > 16:
            a_ptrs = a_rows[:, None] + (k + ks)[None, :]
            w_ptrs = w_rows[:, None] + (k + ks)[None, :]
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok, other=0.0)
        w = tl.load(w_ptrs, mask=col_ok[:, None] & k_ok, other=0.0).to(a.dtype)
        acc += tl.dot(a, tl.trans(w), input_precision=DOT_PRECISION)
        if BLOCK_M == 16:
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
    if HAS_SCALE:
        acc *= tl.load(scale_ptr + expert * stride_se + cols, mask=col_ok, other=0.0)[None, :]
    out_ptrs = out_ptr + pairs[:, None].to(tl.int64) * stride_om + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def fused_moe(x: torch.Tensor, router_logits: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, top_k: int,
              renormalize: bool, activation: str = "silu", expert_map: torch.Tensor | None = None,
              w13_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None,
              plans: tuple[MoEPlan, MoEPlan] | None = None) -> torch.Tensor:
    """The reference's semantics (runtime.platform.reference.moe.fused_moe): routing, the sort (one
    launch or two), gate/up, down and the sum of each token's pairs.

    ``plans`` (gate/up, down) replaces :func:`plans_for`'s (``benchmarks/kernels_gpu.py
    moe-sweep`` times others); their ``block_m`` must agree, the sort pads to it."""
    if activation not in ("silu", "gelu", "gelu_tanh"):
        raise ValueError(f"fused_moe: activation must be silu, gelu or gelu_tanh, got {activation!r}")
    tokens, hidden = x.shape
    if tokens == 0:
        return x.new_zeros(0, hidden)
    x = x if x.stride(-1) == 1 else x.contiguous()
    experts, width = w13.shape[0], w2.shape[2]
    pairs = tokens * top_k
    gate_up_plan, down_plan = plans or plans_for(pairs, experts, x.dtype)
    if gate_up_plan.block_m != down_plan.block_m:
        raise ValueError(f"fused_moe: the two plans' block_m differ ({gate_up_plan.block_m}, {down_plan.block_m})")
    weights, ids, sorted_pairs, block_expert = route_and_sort(router_logits, top_k, renormalize, experts,
                                                              gate_up_plan.block_m, expert_map)
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    has_scale = w13_scale is not None
    activated = torch.empty(sorted_pairs.numel(), width, dtype=x.dtype, device=x.device)
    _gate_up_kernel[(block_expert.numel(), triton.cdiv(width, gate_up_plan.block_n))](
        x, w13, w13_scale if has_scale else w13, activated, sorted_pairs, block_expert,
        pairs, experts, width, hidden, top_k,
        x.stride(0), w13.stride(0), w13.stride(1), w13_scale.stride(0) if has_scale else 0, activated.stride(0),
        HAS_SCALE=has_scale, ACTIVATION=activation, DOT_PRECISION=precision,
        BLOCK_M=gate_up_plan.block_m, BLOCK_N=gate_up_plan.block_n, BLOCK_K=gate_up_plan.block_k,
        num_warps=gate_up_plan.num_warps, num_stages=gate_up_plan.num_stages)
    # Every pair's row is written unless some pairs belong to other ranks' experts.
    alloc = torch.zeros if expert_map is not None else torch.empty
    per_pair = alloc(pairs, hidden, dtype=x.dtype, device=x.device)
    _down_kernel[(block_expert.numel(), triton.cdiv(hidden, down_plan.block_n))](
        activated, w2, w2_scale if has_scale else w2, per_pair, sorted_pairs, block_expert,
        pairs, experts, hidden, width,
        activated.stride(0), w2.stride(0), w2.stride(1), w2_scale.stride(0) if has_scale else 0, per_pair.stride(0),
        HAS_SCALE=has_scale, DOT_PRECISION=precision,
        BLOCK_M=down_plan.block_m, BLOCK_N=down_plan.block_n, BLOCK_K=down_plan.block_k,
        num_warps=down_plan.num_warps, num_stages=down_plan.num_stages)
    out = torch.empty(tokens, hidden, dtype=x.dtype, device=x.device)
    block_h = min(1024, triton.next_power_of_2(hidden))
    _combine_kernel[(tokens, triton.cdiv(hidden, block_h))](per_pair, weights, out, hidden, TOP_K=top_k,
                                                             BLOCK_H=block_h)
    return out


@triton.jit
def _combine_kernel(per_pair_ptr, routing_ptr, out_ptr, hidden, TOP_K: tl.constexpr, BLOCK_H: tl.constexpr):
    """out[t] = the sum of token t's k pair rows times their routing weights (float32, in routing
    order), rounded once to out's dtype."""
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    ok = cols < hidden
    total = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for i in tl.static_range(TOP_K):
        pair = token * TOP_K + i
        row = tl.load(per_pair_ptr + pair * hidden + cols, mask=ok, other=0.0).to(tl.float32)
        total += tl.load(routing_ptr + pair) * row
    tl.store(out_ptr + token * hidden + cols, total.to(out_ptr.dtype.element_ty), mask=ok)
