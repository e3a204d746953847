"""The fused_moe reference against a token-by-token float64 computation of an MoE block (HF's
routing: softmax, top-k, optional renormalisation), with skewed routing, empty experts, top-k 1 to
8, a rank holding some experts and float8 experts; and the conformance check rejects kernels that
get routing, combining or expert parallelism wrong. (HF's routing itself is what the tiny MoE
models check, token for token: tests/test_moe_models.py.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from runtime.platform.reference import OPS
from runtime_conformance.kernel_checks import check_fused_moe


def naive_moe(x, logits, w13, w2, top_k, renormalize, experts_here=None):
    """Per token, per chosen expert, in float64: what an MoE block computes (HF's loop, unsorted)."""
    probs = torch.softmax(logits.double(), dim=-1)
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        top, ids = torch.topk(probs[t], top_k)
        if renormalize:
            top = top / top.sum()
        for weight, e in zip(top.tolist(), ids.tolist()):
            if experts_here is not None and e not in experts_here:
                continue
            local = e if experts_here is None else experts_here.index(e)
            gate, up = (w13[local].double() @ x[t].double()).chunk(2)
            out[t] += weight * (w2[local].double() @ (F.silu(gate) * up))
    return out


def _inputs(g, tokens, experts, hidden=24, width=20):
    x = torch.randn(tokens, hidden, generator=g)
    logits = 2 * torch.randn(tokens, experts, generator=g)
    logits[:, 0] += 5  # skewed: expert 0 takes most pairs
    logits[:, -2:] -= 40  # and the last two none
    w13 = torch.randn(experts, 2 * width, hidden, generator=g) * hidden ** -0.5
    w2 = torch.randn(experts, hidden, width, generator=g) * width ** -0.5
    return x, logits, w13, w2


@pytest.mark.parametrize("top_k", [1, 2, 4, 8])
@pytest.mark.parametrize("renormalize", [True, False])
def test_reference_matches_a_token_by_token_moe(top_k, renormalize):
    g = torch.Generator().manual_seed(top_k)
    x, logits, w13, w2 = _inputs(g, 11, 8)
    got = OPS["fused_moe"](x.double(), logits, w13.double(), w2.double(), top_k, renormalize)
    torch.testing.assert_close(got, naive_moe(x, logits, w13, w2, top_k, renormalize), rtol=1e-6, atol=1e-6)


def test_reference_on_a_rank_holding_some_experts():
    g = torch.Generator().manual_seed(5)
    x, logits, w13, w2 = _inputs(g, 9, 8)
    here = [0, 3, 6]
    expert_map = torch.full((8,), -1, dtype=torch.int32)
    expert_map[here] = torch.arange(3, dtype=torch.int32)
    got = OPS["fused_moe"](x.double(), logits, w13[here].double(), w2[here].double(), 2, True, expert_map=expert_map)
    torch.testing.assert_close(got, naive_moe(x, logits, w13[here], w2[here], 2, True, experts_here=here),
                               rtol=1e-6, atol=1e-6)
    # A token whose experts are all elsewhere gets zeros.
    nowhere = torch.full((8,), -1, dtype=torch.int32)
    assert torch.equal(OPS["fused_moe"](x, logits, w13[:0], w2[:0], 2, True, expert_map=nowhere), torch.zeros_like(x))


def test_reference_dequantizes_float8_experts():
    g = torch.Generator().manual_seed(6)
    x, logits, w13, w2 = _inputs(g, 5, 4)
    scale13, scale2 = torch.rand(4, w13.shape[1], generator=g) + 0.5, torch.rand(4, w2.shape[1], generator=g) + 0.5
    q13, q2 = w13.to(torch.float8_e4m3fn), w2.to(torch.float8_e4m3fn)
    got = OPS["fused_moe"](x, logits, q13, q2, 2, False, w13_scale=scale13, w2_scale=scale2)
    expected = naive_moe(x, logits, q13.double() * scale13[..., None], q2.double() * scale2[..., None], 2, False)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)


def _renormalizes_always(x, logits, w13, w2, top_k, renormalize, *args, **kwargs):
    return OPS["fused_moe"](x, logits, w13, w2, top_k, True, *args, **kwargs)


def _ignores_expert_map(x, logits, w13, w2, top_k, renormalize, activation="silu", expert_map=None, **kwargs):
    if expert_map is not None:  # computes every pair with some local expert
        return OPS["fused_moe"](x, logits[:, :w13.shape[0]], w13, w2, top_k, renormalize, activation, **kwargs)
    return OPS["fused_moe"](x, logits, w13, w2, top_k, renormalize, activation, **kwargs)


def _top_1_weight_only(x, logits, w13, w2, top_k, renormalize, *args, **kwargs):
    out = OPS["fused_moe"](x, logits, w13, w2, 1, False, *args, **kwargs)
    return out if top_k > 1 else OPS["fused_moe"](x, logits, w13, w2, top_k, renormalize, *args, **kwargs)


@pytest.mark.parametrize("broken,message", [
    (_renormalizes_always, r"fused_moe \(37 tokens x top-1 of 8 experts, pairs per expert \[\d+, \d+, 0, .*renormalize=False"),
    (_ignores_expert_map, r"this rank holding the odd experts"),
    (_top_1_weight_only, r"fused_moe \(1 tokens x top-2 of 8 experts"),
])
def test_conformance_check_rejects_wrong_kernels(broken, message):
    with pytest.raises(AssertionError, match=message):
        check_fused_moe(broken, torch.float32, torch.device("cpu"), torch.Generator().manual_seed(0))
