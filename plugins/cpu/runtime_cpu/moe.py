"""``fused_moe`` on the CPU: the reference's routing, then every expert's rows in one grouped matmul
per projection (``torch.nn.functional.grouped_mm`` over the token/expert pairs sorted by expert),
no loop on the host and no read-back of the experts' counts.

Measured on one thread (float32, 8 experts, hidden 512, 4096 sorted rows against a [2048, 512]
gate/up stack): the grouped matmul 0.60 s against 0.90 s for a loop of one matmul per expert;
for a decode step (2 pairs) 1.8 ms against 4.6 ms for gathering each pair's expert weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from runtime.platform.reference import select_experts
from runtime.platform.reference.moe import expert_weight, gated_activation

from . import batch_invariant


def _dequantized(w: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Stacked expert weights in ``dtype``; float8 ones times their per-channel scales."""
    return w if scale is None else (w.float() * scale[..., None]).to(dtype)


def fused_moe(x: torch.Tensor, router_logits: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, top_k: int,
              renormalize: bool, activation: str = "silu", expert_map: torch.Tensor | None = None,
              w13_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The reference's semantics (runtime.platform.reference.moe.fused_moe)."""
    tokens, hidden = x.shape
    if tokens == 0:
        return x.new_zeros(0, hidden)
    weights, ids = select_experts(router_logits, top_k, renormalize, expert_map)
    experts = w13.shape[0]
    flat = ids.flatten()
    flat = torch.where(flat < 0, experts, flat)  # other ranks' pairs sort after every expert here
    order = torch.argsort(flat, stable=True)
    ends = torch.bincount(flat, minlength=experts + 1)[:experts].cumsum(0).to(torch.int32)
    token_of_pair = order // top_k
    rows = x.index_select(0, token_of_pair)
    gate_up = F.grouped_mm(rows, _dequantized(w13, w13_scale, x.dtype).transpose(1, 2), offs=ends)
    act = gated_activation(gate_up, activation).to(x.dtype)
    down = F.grouped_mm(act, _dequantized(w2, w2_scale, x.dtype).transpose(1, 2), offs=ends)
    # Rows past the last expert's end (pairs of other ranks) are left unwritten by grouped_mm.
    mine = torch.arange(order.numel()) < ends[-1]
    contribution = torch.where(mine[:, None], down.float() * weights.flatten()[order, None], 0.0)
    out = torch.zeros(tokens, hidden, dtype=torch.float32)
    return out.index_add_(0, token_of_pair, contribution).to(x.dtype)


def batch_invariant_fused_moe(x: torch.Tensor, router_logits: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                              top_k: int, renormalize: bool, activation: str = "silu",
                              expert_map: torch.Tensor | None = None, w13_scale: torch.Tensor | None = None,
                              w2_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``fused_moe`` for ``--deterministic``: a token's result does not depend on the tokens beside it.

    The grouped matmul above blocks each expert's rows by how many there are, as torch's matmul
    does, so a token's products change with the tokens routed to the same expert. Here each
    expert used runs its rows through the padded projection of ``batch_invariant.linear`` (every
    row in a full tile of the CPU's sgemm), and each token's k results are summed in a fixed order
    (its routing slots), as the reference does. One host loop over the experts used: the mode
    trades speed for reproducibility."""
    tokens, hidden = x.shape
    if tokens == 0:
        return x.new_zeros(0, hidden)
    weights, ids = select_experts(router_logits, top_k, renormalize, expert_map)
    per_slot = torch.zeros(tokens, top_k, hidden, dtype=torch.float32)
    for expert in ids.unique().tolist():
        if expert < 0:
            continue  # another rank's expert: adds nothing here
        token_of, slot = (ids == expert).nonzero(as_tuple=True)
        gate_up = batch_invariant.linear(x[token_of], expert_weight(w13, w13_scale, expert, x.dtype))
        act = gated_activation(gate_up, activation).to(x.dtype)
        down = batch_invariant.linear(act, expert_weight(w2, w2_scale, expert, x.dtype))
        per_slot[token_of, slot] = down.float() * weights[token_of, slot, None]
    return per_slot.sum(dim=1).to(x.dtype)
