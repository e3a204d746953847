"""The Triton fused_moe against the core's reference: skewed routing (one expert taking most pairs,
others none), top-k 1 to 8, decode- and prefill-sized steps (both tile plans), a rank holding
some experts, float8 experts; and the pair sorting it launches over."""

from __future__ import annotations

import pytest
import torch

from runtime.platform.reference import OPS

moe = pytest.importorskip("runtime_triton.moe", reason="needs runtime-cuda and triton (pip install -e plugins/cuda)")

TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# (tokens, top_k) over 8 experts: a decode step; a chunk past SMALL_PAIRS pairs (the torch sort)
# still on the decode plans; chunks on the 64-row and 128-row plans; every expert per token.
STEPS = {"decode": (2, 2), "chunk": (40, 2), "middle": (80, 2), "prefill": (300, 2), "top_1": (70, 1),
         "top_8_of_8": (5, 8)}


def _inputs(g, tokens, dtype, experts=8, hidden=40, width=24):
    x = torch.randn(tokens, hidden, generator=g).to(dtype)
    logits = 2 * torch.randn(tokens, experts, generator=g)
    logits[:, 5] += 6  # most pairs go to expert 5
    logits[:, :2] -= 40  # none to experts 0 and 1
    w13 = (torch.randn(experts, 2 * width, hidden, generator=g) * hidden ** -0.5).to(dtype)
    w2 = (torch.randn(experts, hidden, width, generator=g) * 2 * width ** -0.5).to(dtype)
    return x, logits, w13, w2


def _close(got, expected, dtype):
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got.cpu(), expected, atol=tol * max(1.0, expected.abs().max().item()), rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("step", STEPS)
def test_fused_moe_matches_the_reference(step, dtype, device, require_dot):
    require_dot(dtype)
    tokens, top_k = STEPS[step]
    g = torch.Generator().manual_seed(1)
    x, logits, w13, w2 = _inputs(g, tokens, dtype)
    expected = OPS["fused_moe"](x, logits, w13, w2, top_k, True)
    _close(moe.fused_moe(*(t.to(device) for t in (x, logits, w13, w2)), top_k, True), expected, dtype)


@pytest.mark.parametrize("step", ["decode", "prefill"])
def test_fused_moe_on_a_rank_holding_some_experts(step, device):
    tokens, top_k = STEPS[step]
    x, logits, w13, w2 = _inputs(torch.Generator().manual_seed(2), tokens, torch.float32)
    expert_map = torch.tensor([-1, -1, 0, -1, 1, 2, -1, 3], dtype=torch.int32)
    here = expert_map >= 0
    expected = OPS["fused_moe"](x, logits, w13[here], w2[here], top_k, False, expert_map=expert_map)
    got = moe.fused_moe(*(t.to(device) for t in (x, logits, w13[here], w2[here])), top_k, False,
                        expert_map=expert_map.to(device))
    _close(got, expected, torch.float32)


def test_fused_moe_reads_float8_experts(device):
    from runtime_cuda.quant import Fp8Method

    x, logits, w13, w2 = _inputs(torch.Generator().manual_seed(3), 40, torch.float32)
    (q13, s13), (q2, s2) = (Fp8Method().quantize_experts(w.to(device)) for w in (w13, w2))
    assert q13.dtype == torch.float8_e4m3fn and s13.shape == w13.shape[:2]
    expected = OPS["fused_moe"](x, logits, q13.cpu(), q2.cpu(), 2, True, w13_scale=s13.cpu(), w2_scale=s2.cpu())
    got = moe.fused_moe(x.to(device), logits.to(device), q13, q2, 2, True, w13_scale=s13, w2_scale=s2)
    _close(got, expected, torch.float32)
    # Dequantized, the experts are within e4m3's rounding of the originals.
    torch.testing.assert_close(q13.cpu().float() * s13.cpu()[..., None], w13, atol=0, rtol=2 ** -4)


def _sort_reference(ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """align_pairs in torch ops: a stable argsort by expert, each run padded to whole blocks."""
    pairs = ids.numel()
    device = ids.device
    flat = ids.flatten().long()
    flat = torch.where(flat < 0, num_experts, flat)
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts[:num_experts] + block_m - 1) // block_m * block_m
    padded_ends = padded.cumsum(0)
    # Each expert's first sorted row; pairs of other ranks (the extra "expert") go to a dump row.
    capacity = moe.sorted_rows(pairs, num_experts, block_m)
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


def _routed_and_sorted(ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """route_and_sort on router logits that choose ``ids`` (in that order; -1 through an expert map
    sending extra global experts to another rank): its sort, after checking it routed to ``ids``."""
    tokens, top_k = ids.shape
    device = ids.device
    ids = ids.cpu()
    chosen = torch.where(ids < 0, num_experts + torch.arange(top_k), ids)
    logits = torch.full((tokens, num_experts + top_k), -30.0)
    logits.scatter_(1, chosen, (top_k - torch.arange(top_k, dtype=torch.float32)).expand(tokens, top_k).contiguous())
    expert_map = torch.cat([torch.arange(num_experts), torch.full((top_k,), -1)]).to(torch.int32)
    _, routed, sorted_pairs, block_expert = moe.route_and_sort(logits.to(device), top_k, False, num_experts, block_m,
                                                               expert_map.to(device))
    assert torch.equal(routed.cpu().long(), ids.long())
    return sorted_pairs, block_expert


SORTS = {"one-program": _routed_and_sorted, "counted": lambda *args: moe.align_pairs(*args),
         "reference": _sort_reference}


@pytest.mark.parametrize("align", SORTS)
def test_pairs_are_sorted_by_expert_into_padded_blocks(align, device):
    ids = torch.tensor([[3, 0], [3, 1], [-1, 3], [0, 3]])
    sorted_pairs, block_expert = (t.cpu() for t in SORTS[align](ids.to(device), 4, 4))
    pairs = ids.numel()
    # Experts 0 (2 pairs), 1 (1), 3 (4) each fill one padded block of 4; expert 2 has none.
    assert block_expert.tolist()[:3] == [0, 1, 3] and set(block_expert.tolist()[3:]) == {4}
    blocks = [sorted(block) for block in sorted_pairs.view(-1, 4).tolist()]  # the counted sort's runs in any order
    assert blocks[0] == [1, 6, pairs, pairs] and blocks[1] == [3, pairs, pairs, pairs] and blocks[2] == [0, 2, 5, 7]
    assert len(sorted_pairs) >= pairs + 4 * 3  # room for the worst padding
    assert (sorted_pairs == 4).sum() == 0  # the pair of another rank's expert (pair 4) is nowhere


@pytest.mark.parametrize("tokens,top_k,experts,block_m", [
    (1, 2, 8, 16), (2, 2, 8, 16), (8, 8, 128, 16), (32, 2, 8, 16), (13, 4, 60, 16), (5, 1, 3, 64),
], ids=["one-token", "decode", "qwen3-top8", "full", "uneven", "wide-blocks"])
def test_the_one_program_sort_equals_the_torch_ops(tokens, top_k, experts, block_m, device):
    """A decode step's routing and sort (one Triton program) against the torch ops' sort on random
    routings, some pairs on another rank's experts (-1): the same rows, padding and block experts."""
    g = torch.Generator().manual_seed(tokens * 100 + experts)
    for _ in range(5):
        ids = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(tokens)])
        ids[torch.rand(ids.shape, generator=g) < 0.2] = -1
        assert ids.numel() <= moe.SMALL_PAIRS
        got = _routed_and_sorted(ids.to(device), experts, block_m)
        expected = _sort_reference(ids, experts, block_m)
        for a, b in zip(got, expected):
            assert torch.equal(a.cpu(), b)


def test_a_decode_step_too_wide_for_one_program_is_routed_and_sorted_apart(device, monkeypatch):
    """10 tokens of top-6 over 256 experts: 60 pairs, but tables past what one program holds in
    registers, so route and the counted sort run: the same experts' runs as the torch ops'."""
    g = torch.Generator().manual_seed(7)
    ids = torch.stack([torch.randperm(256, generator=g)[:6] for _ in range(10)])
    assert ids.numel() <= moe.SMALL_PAIRS
    routed, route = [], moe.route
    monkeypatch.setattr(moe, "route", lambda *args: routed.append(args) or route(*args))
    sorted_pairs, block_expert = (t.cpu() for t in _routed_and_sorted(ids.to(device), 256, 16))
    assert len(routed) == 1
    expected_pairs, expected_blocks = _sort_reference(ids, 256, 16)
    assert torch.equal(block_expert, expected_blocks)
    for run in block_expert.unique():
        rows = (block_expert == run).repeat_interleave(16)
        assert sorted(sorted_pairs[rows].tolist()) == sorted(expected_pairs[rows].tolist())


@pytest.mark.parametrize("tokens,top_k,experts,block_m", [(40, 2, 8, 16), (300, 2, 8, 128), (256, 8, 128, 16),
                                                          (33, 8, 60, 64), (64, 8, 256, 16)],
                         ids=["mixtral-chunk", "wide-blocks", "qwen3-decode-batch", "uneven", "many-experts"])
def test_the_counted_sort_equals_the_torch_ops_within_each_run(tokens, top_k, experts, block_m, device):
    """Past SMALL_PAIRS pairs (atomics order each expert's pairs): the same blocks' experts, the same
    padding rows, and each expert's run holds the same pairs."""
    g = torch.Generator().manual_seed(tokens + experts)
    ids = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(tokens)])
    ids[torch.rand(ids.shape, generator=g) < 0.2] = -1
    assert ids.numel() > moe.SMALL_PAIRS
    sorted_pairs, block_expert = (t.cpu() for t in moe.align_pairs(ids.to(device), experts, block_m))
    expected_pairs, expected_blocks = _sort_reference(ids, experts, block_m)
    assert torch.equal(block_expert, expected_blocks)
    assert torch.equal(sorted_pairs == ids.numel(), expected_pairs == ids.numel())
    for run in block_expert.unique():
        rows = (block_expert == run).repeat_interleave(block_m)
        assert sorted(sorted_pairs[rows].tolist()) == sorted(expected_pairs[rows].tolist())


@pytest.mark.parametrize("align,pairs,experts,block_m", [
    *((align, pairs, 128, 16) for align in SORTS for pairs in (8, 64)),
    *((align, pairs, experts, block_m) for align in ("counted", "reference") for pairs, experts, block_m in ((300, 128, 16), (600, 8, 128)))
], ids=lambda v: str(v))
def test_the_sort_fits_its_rows_when_every_pair_has_its_own_expert(align, pairs, experts, block_m, device):
    """The launches are sized by sorted_rows (at most one block a pair): the routing that pads the
    most, as many experts used as can be, still places every pair once."""
    g = torch.Generator().manual_seed(pairs)
    ids = (torch.randperm(pairs, generator=g) % experts).view(-1, 2)
    sorted_pairs, block_expert = (t.cpu() for t in SORTS[align](ids.to(device), experts, block_m))
    assert len(sorted_pairs) == moe.sorted_rows(pairs, experts, block_m) == len(block_expert) * block_m
    assert sorted(sorted_pairs[sorted_pairs < pairs].tolist()) == list(range(pairs))
    expert_of_row = block_expert.repeat_interleave(block_m)
    placed = sorted_pairs < pairs
    assert torch.equal(expert_of_row[placed], ids.flatten()[sorted_pairs[placed].long()])


@pytest.mark.parametrize("experts,top_k", [(8, 2), (60, 4), (128, 8), (8, 1), (3, 3)])
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("logits_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_routing_equals_the_reference_select_experts(experts, top_k, renormalize, logits_dtype, device):
    """The one-launch routing against torch's softmax and topk: the same experts in the same order,
    the same weights to float32 rounding, another rank's experts -1 through the map. (Distinct
    logits, exact in bfloat16: which of two equal ones torch.topk takes is not specified.)"""
    from runtime.platform.reference import select_experts

    g = torch.Generator().manual_seed(experts * 10 + top_k)
    logits = torch.stack([torch.randperm(experts, generator=g) - experts // 2 for _ in range(33)]) / 16
    logits = logits.to(logits_dtype)
    expert_map = torch.randperm(experts, generator=g).to(torch.int32)
    expert_map[torch.rand(experts, generator=g) < 0.3] = -1
    for mapping in (None, expert_map):
        weights, ids = moe.route(logits.to(device), top_k, renormalize, None if mapping is None else mapping.to(device))
        expected_weights, expected_ids = select_experts(logits, top_k, renormalize, mapping)
        assert ids.dtype == torch.int32 and torch.equal(ids.cpu().long(), expected_ids)
        torch.testing.assert_close(weights.cpu(), expected_weights, atol=1e-6, rtol=1e-5)


def test_routing_takes_the_lowest_expert_among_equal_logits(device):
    logits = torch.tensor([[0.0, 2.0, 1.0, 2.0, 2.0], [5.0, 5.0, 5.0, 5.0, 5.0]])
    weights, ids = moe.route(logits.to(device), 3, False)
    assert ids.cpu().tolist() == [[1, 3, 4], [0, 1, 2]]
    torch.testing.assert_close(weights.cpu()[1], torch.full((3,), 0.2))
