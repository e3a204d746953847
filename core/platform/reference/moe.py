"""A mixture-of-experts layer's routed experts (contract 1.6): ``fused_moe``.

Route (softmax over the router's logits, top-k, optionally renormalised), sort the token/expert
pairs by expert, multiply each expert's run of rows by its gate/up weights, apply the gated
activation, multiply by its down weights, and add each token's k outputs weighted by its routing
weights. The reference loops over the experts present (one host read of their counts); a
platform's kernel does the same without looping on the host.

Expert weights are stacked: ``w13`` [E, 2I, H] holds each expert's gate rows then its up rows,
``w2`` [E, H, I] its down projection. With ``w13_scale``/``w2_scale`` the weights are float8
(e4m3) with one float32 scale per expert and output channel: the weight is ``w * scale[..., None]``.
``expert_map`` (expert parallelism) maps every global expert id to this rank's stacked index, or
-1 for an expert another rank holds: pairs routed there contribute nothing here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MOE_ACTIVATIONS = ("silu", "gelu", "gelu_tanh")
"""The gated activations ``fused_moe`` takes: act(gate) * up."""


def select_experts(router_logits: torch.Tensor, top_k: int, renormalize: bool,
                   expert_map: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] -> (weights [T, k] float32, ids [T, k] int64 of this rank's stacked
    experts, -1 where another rank holds the expert).

    Softmax in float32, the k largest probabilities (``torch.topk``, as HF), divided by their sum
    when ``renormalize`` (Mixtral always; Qwen-MoE when ``norm_topk_prob``).
    """
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if expert_map is not None:
        ids = expert_map[ids].long()
    return weights, ids


def gated_activation(gate_up: torch.Tensor, activation: str) -> torch.Tensor:
    """[..., 2I] (gate | up) -> act(gate) * up in float32."""
    gate, up = gate_up.float().chunk(2, dim=-1)
    if activation == "silu":
        return F.silu(gate) * up
    if activation in ("gelu", "gelu_tanh"):
        return F.gelu(gate, approximate="tanh" if activation == "gelu_tanh" else "none") * up
    raise ValueError(f"fused_moe: activation must be one of {', '.join(MOE_ACTIVATIONS)}, got {activation!r}")


def expert_weight(w: torch.Tensor, scale: torch.Tensor | None, expert: int, dtype: torch.dtype) -> torch.Tensor:
    """One expert's [N, K] weight in ``dtype``: dequantized from float8 when it has scales."""
    if scale is None:
        return w[expert]
    return (w[expert].float() * scale[expert, :, None]).to(dtype)


def fused_moe(x: torch.Tensor, router_logits: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, top_k: int,
              renormalize: bool, activation: str = "silu", expert_map: torch.Tensor | None = None,
              w13_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, H], router_logits [T, E_global] -> [T, H] in x's dtype: the routed experts' outputs,
    each token's k weighted by its routing weights (``select_experts``) and summed.

    Each expert's product rounds to x's dtype as a projection would (gate/up once, the activation
    once, down once); the weighted sum is taken in float32 and rounded once. Pairs whose expert
    is not on this rank (``expert_map`` -1) add nothing; a token whose experts are all elsewhere
    gets zeros.
    """
    weights, ids = select_experts(router_logits, top_k, renormalize, expert_map)
    tokens, hidden = x.shape
    flat_ids = ids.flatten()
    order = torch.argsort(flat_ids, stable=True)
    sorted_ids = flat_ids[order]
    rows = x[order // top_k]  # the sorted pairs' token rows
    counts = torch.bincount(sorted_ids.clamp(min=0), minlength=w13.shape[0]) if sorted_ids.numel() else None
    pair_out = torch.zeros(sorted_ids.numel(), hidden, dtype=x.dtype, device=x.device)
    start = int((sorted_ids < 0).sum())  # pairs of other ranks' experts sort first
    counts = counts.tolist() if counts is not None else []
    if start and counts:
        counts[0] -= start  # those pairs were counted as expert 0 by the clamp
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        run = slice(start, start + count)
        gate_up = F.linear(rows[run], expert_weight(w13, w13_scale, expert, x.dtype))
        act = gated_activation(gate_up, activation).to(x.dtype)
        pair_out[run] = F.linear(act, expert_weight(w2, w2_scale, expert, x.dtype))
        start += count
    combined = torch.zeros(tokens * top_k, hidden, dtype=torch.float32, device=x.device)
    combined[order] = pair_out.float() * weights.flatten()[order, None]
    return combined.view(tokens, top_k, hidden).sum(dim=1).to(x.dtype)
