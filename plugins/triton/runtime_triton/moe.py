"""``fused_moe`` (contract 1.6) as two Triton grouped GEMMs over token/expert pairs sorted by expert.

Routing is the reference's (softmax, top-k, optional renormalisation: a few small torch ops).
The pairs are then sorted by expert and each expert's run padded to a multiple of ``BLOCK_M``
(``align_pairs``: one Triton program for a decode step, torch ops on the device beyond; sized
from the shapes alone), so every block of
``BLOCK_M`` sorted rows belongs to one expert. Two launches follow:

- gate/up: a program owns one block of rows and ``BLOCK_N`` columns of the intermediate width; it
  gathers its rows' tokens from ``x``, multiplies them by the same columns of its expert's gate
  and up weights in one pass over the hidden size, and writes ``act(gate) * up`` for its rows.
- down: a program owns one block of those rows and ``BLOCK_N`` hidden columns; it multiplies by
  its expert's down weights, scales each row by its routing weight and writes it at its pair.

A torch sum over each token's k pairs finishes the op. Blocks past the last expert's (the launch
is sized for the worst padding) return at once, so nothing is read back on the host and the op
is captured in CUDA graphs. float8 expert weights (``Fp8Method.quantize_experts``) are read as
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

from runtime.platform.reference import select_experts

# At most this many sorted rows use the decode plan (the smallest tile tl.dot takes, narrow
# column tiles so a batch of a few tokens still spreads its weight reads over every SM).
SMALL_PAIRS = 64


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
# at 2048 tokens 128 x 128 took 3.64 ms, 64 x 64 5.61.
DECODE_PLANS = (MoEPlan(block_m=16, block_n=32, block_k=256, num_warps=8, num_stages=4),
                MoEPlan(block_m=16, block_n=64, block_k=256, num_warps=8, num_stages=4))
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


def align_pairs(ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [T, k] (stacked expert per pair, -1: another rank's) -> (sorted_pairs [capacity] int32:
    the pair at each sorted row, ``T * k`` for padding; block_expert [capacity / block_m] int32:
    each block's expert, ``num_experts`` past the last used block).

    Expert e's pairs occupy rows from its padded start on, in pair order; each expert's run is
    padded to a multiple of ``block_m``. ``capacity`` is :func:`sorted_rows`. Up to
    ``SMALL_PAIRS`` pairs one Triton program does it (a decode step's layer would otherwise spend
    about 20 small torch kernels on it, more time than some of its expert products); beyond, the
    torch ops of :func:`align_pairs_torch`.
    """
    pairs = ids.numel()
    if pairs > SMALL_PAIRS:
        return align_pairs_torch(ids, num_experts, block_m)
    capacity = sorted_rows(pairs, num_experts, block_m)
    sorted_pairs = torch.empty(capacity, dtype=torch.int32, device=ids.device)
    block_expert = torch.empty(capacity // block_m, dtype=torch.int32, device=ids.device)
    block_p = max(16, triton.next_power_of_2(pairs))
    _align_small_kernel[(1,)](ids.flatten().contiguous(), sorted_pairs, block_expert, pairs, num_experts, capacity,
                              capacity // block_m, BLOCK_M=block_m, BLOCK_P=block_p,
                              BLOCK_E=max(16, triton.next_power_of_2(num_experts + 1)),
                              BLOCK_R=ALIGN_ELEMENTS // block_p, num_warps=4)
    return sorted_pairs, block_expert


# The one-program sort matches this many (sorted row, pair) candidates at a time: compiled for
# sm_90, 64 pairs of 128 experts then use 164 registers and spill nothing (256 rows at a time: 255
# and a spill).
ALIGN_ELEMENTS = 4096


@triton.jit
def _align_small_kernel(ids_ptr, sorted_ptr, block_expert_ptr, pairs, num_experts, capacity, blocks,
                        BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_R: tl.constexpr):
    """align_pairs in one program: each pair's rank among its expert's pairs from a running count
    over a one-hot [pairs, experts] table, each expert's padded start from a running sum of the
    padded counts; every sorted row then looks up the pair that lands on it (no scatter, so no
    two threads write one address)."""
    p = tl.arange(0, BLOCK_P)
    e = tl.arange(0, BLOCK_E)
    valid = p < pairs
    ids = tl.load(ids_ptr + p, mask=valid, other=-1).to(tl.int32)
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
        pair = tl.sum(tl.where(lands, p[None, :], 0), axis=1)
        found = tl.sum(lands.to(tl.int32), axis=1) > 0
        tl.store(sorted_ptr + rows, tl.where(found, pair, pairs), mask=rows < capacity)
    for first in range(0, blocks, BLOCK_R):
        block = first + tl.arange(0, BLOCK_R)
        before = (ends[None, :] <= (block * BLOCK_M)[:, None]) & (e[None, :] < num_experts)
        tl.store(block_expert_ptr + block, tl.sum(before.to(tl.int32), axis=1), mask=block < blocks)


def align_pairs_torch(ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`align_pairs` in torch ops on the device (any number of pairs)."""
    pairs = ids.numel()
    device = ids.device
    flat = ids.flatten()
    flat = torch.where(flat < 0, num_experts, flat)
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts[:num_experts] + block_m - 1) // block_m * block_m
    padded_ends = padded.cumsum(0)
    # Each expert's first sorted row; pairs of other ranks (the extra "expert") go to a dump row.
    capacity = sorted_rows(pairs, num_experts, block_m)
    starts = torch.cat([padded_ends - padded, torch.full((1,), capacity, dtype=torch.int64, device=device)])
    order = torch.argsort(flat, stable=True)
    sorted_experts = flat[order]
    first_of_expert = counts.cumsum(0) - counts
    rows = starts[sorted_experts] + torch.arange(pairs, device=device) - first_of_expert[sorted_experts]
    rows = torch.where(sorted_experts < num_experts, rows, capacity)
    sorted_pairs = torch.full((capacity + 1,), pairs, dtype=torch.int32, device=device)
    sorted_pairs.scatter_(0, rows, order.to(torch.int32))
    block_starts = torch.arange(0, capacity, block_m, device=device)
    block_expert = torch.searchsorted(padded_ends, block_starts, right=True).to(torch.int32)
    return sorted_pairs[:capacity], block_expert


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
    x_ptrs = x_ptr + tokens[:, None] * stride_xm + ks[None, :]
    gate_ptrs = w_ptr + expert * stride_we + cols[:, None].to(tl.int64) * stride_wn + ks[None, :]
    up_ptrs = gate_ptrs + width * stride_wn
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, hidden, BLOCK_K):
        k_ok = ks[None, :] < hidden - k
        x = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok, other=0.0)
        w_gate = tl.load(gate_ptrs, mask=col_ok[:, None] & k_ok, other=0.0).to(x.dtype)
        w_up = tl.load(up_ptrs, mask=col_ok[:, None] & k_ok, other=0.0).to(x.dtype)
        acc_gate += tl.dot(x, tl.trans(w_gate), input_precision=DOT_PRECISION)
        acc_up += tl.dot(x, tl.trans(w_up), input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        gate_ptrs += BLOCK_K
        up_ptrs += BLOCK_K
    if HAS_SCALE:
        scales = scale_ptr + expert * stride_se + cols
        acc_gate *= tl.load(scales, mask=col_ok, other=0.0)[None, :]
        acc_up *= tl.load(scales + width, mask=col_ok, other=0.0)[None, :]
    ty = out_ptr.dtype.element_ty
    act = _activate(acc_gate.to(ty).to(tl.float32), acc_up.to(ty).to(tl.float32), ACTIVATION)
    out_ptrs = out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :]
    tl.store(out_ptrs, act.to(ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _down_kernel(a_ptr, w_ptr, scale_ptr, routing_ptr, out_ptr, sorted_pairs_ptr, block_expert_ptr,
                 num_pairs, num_experts, hidden, width,
                 stride_am, stride_we, stride_wn, stride_se, stride_om,
                 HAS_SCALE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[pair, n] = routing[pair] * (a[row] @ down[e, n]) (float32) for the block's sorted rows."""
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
    a_ptrs = a_ptr + rows[:, None].to(tl.int64) * stride_am + ks[None, :]
    w_ptrs = w_ptr + expert * stride_we + cols[:, None].to(tl.int64) * stride_wn + ks[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, width, BLOCK_K):
        k_ok = ks[None, :] < width - k
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok, other=0.0)
        w = tl.load(w_ptrs, mask=col_ok[:, None] & k_ok, other=0.0).to(a.dtype)
        acc += tl.dot(a, tl.trans(w), input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_SCALE:
        acc *= tl.load(scale_ptr + expert * stride_se + cols, mask=col_ok, other=0.0)[None, :]
    routing = tl.load(routing_ptr + pairs, mask=row_ok, other=0.0)
    acc = acc.to(a_ptr.dtype.element_ty).to(tl.float32) * routing[:, None]
    out_ptrs = out_ptr + pairs[:, None].to(tl.int64) * stride_om + cols[None, :]
    tl.store(out_ptrs, acc, mask=row_ok[:, None] & col_ok[None, :])


def fused_moe(x: torch.Tensor, router_logits: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, top_k: int,
              renormalize: bool, activation: str = "silu", expert_map: torch.Tensor | None = None,
              w13_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None,
              plans: tuple[MoEPlan, MoEPlan] | None = None) -> torch.Tensor:
    """The reference's semantics (runtime.platform.reference.moe.fused_moe) in two launches.

    ``plans`` (gate/up, down) replaces :func:`plans_for`'s (``benchmarks/kernels_gpu.py
    moe-sweep`` times others); their ``block_m`` must agree, the sort pads to it."""
    if activation not in ("silu", "gelu", "gelu_tanh"):
        raise ValueError(f"fused_moe: activation must be silu, gelu or gelu_tanh, got {activation!r}")
    tokens, hidden = x.shape
    if tokens == 0:
        return x.new_zeros(0, hidden)
    x = x if x.stride(-1) == 1 else x.contiguous()
    weights, ids = select_experts(router_logits, top_k, renormalize, expert_map)
    experts, width = w13.shape[0], w2.shape[2]
    pairs = tokens * top_k
    gate_up_plan, down_plan = plans or plans_for(pairs, w13.shape[0], x.dtype)
    if gate_up_plan.block_m != down_plan.block_m:
        raise ValueError(f"fused_moe: the two plans' block_m differ ({gate_up_plan.block_m}, {down_plan.block_m})")
    sorted_pairs, block_expert = align_pairs(ids, experts, gate_up_plan.block_m)
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    has_scale = w13_scale is not None
    activated = torch.empty(sorted_pairs.numel(), width, dtype=x.dtype, device=x.device)
    plan = gate_up_plan
    _gate_up_kernel[(block_expert.numel(), triton.cdiv(width, plan.block_n))](
        x, w13, w13_scale if has_scale else w13, activated, sorted_pairs, block_expert,
        pairs, experts, width, hidden, top_k,
        x.stride(0), w13.stride(0), w13.stride(1), w13_scale.stride(0) if has_scale else 0, activated.stride(0),
        HAS_SCALE=has_scale, ACTIVATION=activation, DOT_PRECISION=precision,
        BLOCK_M=plan.block_m, BLOCK_N=plan.block_n, BLOCK_K=plan.block_k,
        num_warps=plan.num_warps, num_stages=plan.num_stages)
    # Every pair's row is written unless some pairs belong to other ranks' experts.
    alloc = torch.zeros if expert_map is not None else torch.empty
    per_pair = alloc(pairs, hidden, dtype=torch.float32, device=x.device)
    plan = down_plan
    _down_kernel[(block_expert.numel(), triton.cdiv(hidden, plan.block_n))](
        activated, w2, w2_scale if has_scale else w2, weights.flatten().contiguous(), per_pair, sorted_pairs, block_expert,
        pairs, experts, hidden, width,
        activated.stride(0), w2.stride(0), w2.stride(1), w2_scale.stride(0) if has_scale else 0, per_pair.stride(0),
        HAS_SCALE=has_scale, DOT_PRECISION=precision,
        BLOCK_M=plan.block_m, BLOCK_N=plan.block_n, BLOCK_K=plan.block_k,
        num_warps=plan.num_warps, num_stages=plan.num_stages)
    return per_pair.view(tokens, top_k, hidden).sum(dim=1).to(x.dtype)
