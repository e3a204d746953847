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


@pytest.mark.parametrize("align", ["align_pairs", "align_pairs_torch"])
def test_pairs_are_sorted_by_expert_into_padded_blocks(align, device):
    ids = torch.tensor([[3, 0], [3, 1], [-1, 3], [0, 3]])
    sorted_pairs, block_expert = (t.cpu() for t in getattr(moe, align)(ids.to(device), 4, block_m=4))
    pairs = ids.numel()
    # Experts 0 (2 pairs), 1 (1), 3 (4) each fill one padded block of 4; expert 2 has none.
    assert block_expert.tolist()[:3] == [0, 1, 3] and set(block_expert.tolist()[3:]) == {4}
    blocks = sorted_pairs.view(-1, 4).tolist()
    assert blocks[0] == [1, 6, pairs, pairs] and blocks[1] == [3, pairs, pairs, pairs] and blocks[2] == [0, 2, 5, 7]
    assert len(sorted_pairs) >= pairs + 4 * 3  # room for the worst padding
    assert (sorted_pairs == 4).sum() == 0  # the pair of another rank's expert (pair 4) is nowhere


@pytest.mark.parametrize("tokens,top_k,experts,block_m", [
    (1, 2, 8, 16), (2, 2, 8, 16), (8, 8, 128, 16), (32, 2, 8, 16), (13, 4, 60, 16), (5, 1, 3, 64),
], ids=["one-token", "decode", "qwen3-top8", "full", "uneven", "wide-blocks"])
def test_the_one_program_sort_equals_the_torch_ops(tokens, top_k, experts, block_m, device):
    """A decode step's sort (one Triton program) against the torch ops' on random routings, some
    pairs on another rank's experts (-1): the same rows, padding and block experts."""
    g = torch.Generator().manual_seed(tokens * 100 + experts)
    for _ in range(5):
        ids = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(tokens)])
        ids[torch.rand(ids.shape, generator=g) < 0.2] = -1
        assert ids.numel() <= moe.SMALL_PAIRS
        got = moe.align_pairs(ids.to(device), experts, block_m)
        expected = moe.align_pairs_torch(ids, experts, block_m)
        for a, b in zip(got, expected):
            assert torch.equal(a.cpu(), b)


@pytest.mark.parametrize("align", ["align_pairs", "align_pairs_torch"])
@pytest.mark.parametrize("pairs,experts,block_m", [(8, 128, 16), (64, 128, 16), (300, 128, 16), (600, 8, 128)],
                         ids=["decode-one-pair-an-expert", "sixty-four-experts-used", "torch-sort", "wide-blocks"])
def test_the_sort_fits_its_rows_when_every_pair_has_its_own_expert(align, pairs, experts, block_m, device):
    """The launches are sized by sorted_rows (at most one block a pair): the routing that pads the
    most, as many experts used as can be, still places every pair once."""
    g = torch.Generator().manual_seed(pairs)
    ids = (torch.randperm(pairs, generator=g) % experts).view(-1, 2)
    sorted_pairs, block_expert = (t.cpu() for t in getattr(moe, align)(ids.to(device), experts, block_m))
    assert len(sorted_pairs) == moe.sorted_rows(pairs, experts, block_m) == len(block_expert) * block_m
    assert sorted(sorted_pairs[sorted_pairs < pairs].tolist()) == list(range(pairs))
    expert_of_row = block_expert.repeat_interleave(block_m)
    placed = sorted_pairs < pairs
    assert torch.equal(expert_of_row[placed], ids.flatten()[sorted_pairs[placed].long()])
