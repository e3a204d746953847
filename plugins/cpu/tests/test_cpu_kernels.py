"""The CPU plugin's kernels against the core's reference kernels on random inputs."""

from __future__ import annotations

import pytest
import torch

from runtime.platform import reference
from runtime.platform.reference import build_cos_sin_cache
from runtime_cpu import kernels
from runtime_cpu.lora import slot_groups

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("magnitude", [3.0, 1e-3])
def test_rms_norm_and_residual(dtype, magnitude):
    """Rows of both magnitudes: at 1e-3 the mean square is below epsilon, which then sets the scale."""
    torch.manual_seed(0)
    x, residual = (torch.randn(7, 96, dtype=dtype) * magnitude for _ in range(2))
    weight = torch.randn(96, dtype=dtype)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(kernels.rms_norm(x, weight, 1e-5), reference.rms_norm(x, weight, 1e-5), atol=tol, rtol=tol)
    out, summed = kernels.fused_add_rms_norm(x, residual, weight, 1e-6)
    ref_out, ref_summed = reference.fused_add_rms_norm(x, residual, weight, 1e-6)
    torch.testing.assert_close(summed, ref_summed, atol=0, rtol=0)
    torch.testing.assert_close(out, ref_out, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_kernels_give_a_token_the_same_bits_in_any_batch(dtype):
    """Per-head RMSNorm (Qwen3's q/k norm) and rotary on views of a fused qkv output, as the model
    passes them: a one-token view is contiguous by size alone and a longer one is not, and still
    each token's result is bitwise its result alone (what --deterministic needs)."""
    torch.manual_seed(3)
    heads, kv_heads, dim = 4, 2, 64
    qkv = torch.randn(6, (heads + 2 * kv_heads) * dim, dtype=dtype)
    q, k = qkv[:, :heads * dim].view(6, heads, dim), qkv[:, heads * dim:(heads + kv_heads) * dim].view(6, kv_heads, dim)
    weight = torch.randn(dim, dtype=dtype)
    cache = build_cos_sin_cache(dim, 10000.0, 64)
    positions = torch.arange(6) * 5
    normed = kernels.rms_norm(q, weight, 1e-6)
    rotated = kernels.rotary_embedding(positions, q, k, cache)
    for t in range(6):
        assert torch.equal(kernels.rms_norm(q[t:t + 1], weight, 1e-6), normed[t:t + 1])
        alone = kernels.rotary_embedding(positions[t:t + 1], q[t:t + 1], k[t:t + 1], cache)
        assert torch.equal(alone[0], rotated[0][t:t + 1]) and torch.equal(alone[1], rotated[1][t:t + 1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rotary_dim,is_neox", [(64, True), (32, True), (64, False)])
def test_rotary_embedding(dtype, rotary_dim, is_neox):
    torch.manual_seed(1)
    cache = build_cos_sin_cache(rotary_dim, 10000.0, 300, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    positions = torch.randint(0, 300, (11,))
    q, k = torch.randn(11, 8, 64, dtype=dtype), torch.randn(11, 2, 64, dtype=dtype)
    got_q, got_k = kernels.rotary_embedding(positions, q, k, cache, is_neox)
    ref_q, ref_k = reference.rotary_embedding(positions, q, k, cache, is_neox)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got_q, ref_q, atol=tol, rtol=tol)
    torch.testing.assert_close(got_k, ref_k, atol=tol, rtol=tol)


# Steps of long runs only (multiplied where they lie), of short runs only (gathered), and of both.
LORA_STEPS = {
    "one_token": [2],
    "one_adapter": [1] * 40,
    "prompt_chunks": [0] * 30 + [-1] * 7 + [3] * 20,
    "decode": [3, -1, 0, 0, 2, 1, -1, 3, 1, 2, 0, 0],
    "chunk_and_decodes": [1] * 25 + [0, 1, -1, 3, 1],
}


def _lora_inputs(dtype: torch.dtype, tokens: int, g: torch.Generator, in_features=72, out_features=100, rank=16,
                 num_slots=4):
    x = torch.randn(tokens, in_features, generator=g).to(dtype)
    lora_a = (torch.randn(num_slots, rank, in_features, generator=g) * in_features ** -0.5).to(dtype)
    lora_b = torch.randn(num_slots, out_features, rank, generator=g).to(dtype)
    base = torch.randn(tokens, out_features, generator=g).to(dtype)
    return x, lora_a, lora_b, base


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("step", LORA_STEPS)
def test_lora_shrink_and_expand(step, dtype):
    g = torch.Generator().manual_seed(2)
    slots = torch.tensor(LORA_STEPS[step])
    x, lora_a, lora_b, base = _lora_inputs(dtype, len(slots), g)
    tol = TOLERANCE[dtype]
    shrunk = kernels.lora_shrink(x, lora_a, slots, 0.37)
    torch.testing.assert_close(shrunk, reference.lora_shrink(x, lora_a, slots, 0.37), atol=tol, rtol=tol)
    expanded = kernels.lora_expand(shrunk, lora_b, slots, base)
    torch.testing.assert_close(expanded, reference.lora_expand(shrunk, lora_b, slots, base), atol=tol, rtol=tol)
    assert torch.equal(expanded[slots < 0], base[slots < 0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("step", LORA_STEPS)
@pytest.mark.parametrize("slices", [(100,), (60, 20, 20)], ids=["single", "qkv"])
def test_lora_add(slices, step, dtype):
    """Every partition of a fused projection added into its columns of y, in place, in one call."""
    g = torch.Generator().manual_seed(6)
    slots = torch.tensor(LORA_STEPS[step])
    x, _, _, y = _lora_inputs(dtype, len(slots), g)
    lora_a = (torch.randn(4, len(slices) * 16, 72, generator=g) * 72 ** -0.5).to(dtype)
    lora_b = (torch.randn(4, 100, 16, generator=g) * 16 ** -0.5).to(dtype)  # products of magnitude 1
    expected = reference.lora_add(y.clone(), x, lora_a, lora_b, slots, slices, 0.37)
    before = y.clone()
    assert kernels.lora_add(y, x, lora_a, lora_b, slots, slices, 0.37) is y
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(y, expected, atol=tol, rtol=tol)
    assert torch.equal(y[slots < 0], before[slots < 0])


def test_lora_expand_onto_a_view_of_a_fused_output():
    """The model adds each partition's delta to its slice of a fused projection (q of qkv, say)."""
    g = torch.Generator().manual_seed(3)
    slots = torch.tensor(LORA_STEPS["chunk_and_decodes"])
    _, _, lora_b, fused = _lora_inputs(torch.float32, len(slots), g, out_features=300)
    base, shrunk = fused[:, 100:200], torch.randn(len(slots), 16, generator=g)
    assert not base.is_contiguous()
    torch.testing.assert_close(kernels.lora_expand(shrunk, lora_b[:, :100], slots, base),
                               reference.lora_expand(shrunk, lora_b[:, :100], slots, base), atol=1e-5, rtol=1e-5)


def test_lora_of_an_empty_step():
    x, lora_a, lora_b, base = _lora_inputs(torch.float32, 0, torch.Generator().manual_seed(4))
    slots = torch.empty(0, dtype=torch.long)
    assert kernels.lora_shrink(x, lora_a, slots, 1.0).shape == (0, 16)
    assert kernels.lora_expand(torch.empty(0, 16), lora_b, slots, base).shape == (0, 100)
    assert kernels.lora_add(base, x, lora_a, lora_b, slots, [100], 1.0).shape == (0, 100)


def test_slot_groups_gather_only_the_tokens_of_short_runs():
    groups = slot_groups(torch.tensor(LORA_STEPS["prompt_chunks"]))
    assert groups.runs == [(0, slice(0, 30)), (3, slice(37, 57))] and groups.gathered is None
    groups = slot_groups(torch.tensor(LORA_STEPS["chunk_and_decodes"]))
    assert groups.runs == [(1, slice(0, 25))]
    assert groups.gathered.tolist() == [25, 26, 29, 28]  # slot -1 (token 27) needs no product
    assert groups.gathered_runs == [(0, slice(0, 1)), (1, slice(1, 3)), (3, slice(3, 4))]
    assert slot_groups(torch.tensor([2])).runs == [(2, slice(0, 1))]


def test_slot_groups_are_computed_once_per_step():
    x, lora_a, _, _ = _lora_inputs(torch.float32, len(LORA_STEPS["decode"]), torch.Generator().manual_seed(5))
    with torch.inference_mode():  # as the engine runs, where tensors keep no version counter
        slots = torch.tensor(LORA_STEPS["decode"])
        assert slot_groups(slots) is slot_groups(slots.clone())  # every layer of a step shares the step's grouping
        kernels.lora_shrink(x, lora_a, slots, 1.0)
        slots.copy_(slots.flip(0))  # the next step, written into the same (persistent) tensor
        torch.testing.assert_close(kernels.lora_shrink(x, lora_a, slots, 1.0),
                                   reference.lora_shrink(x, lora_a, slots, 1.0), atol=1e-5, rtol=1e-5)


MOE_STEPS = {"decode": (1, 2), "skewed_prefill": (40, 2), "top_8_of_8": (9, 8), "top_1": (17, 1)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("step", MOE_STEPS)
def test_fused_moe(step, dtype):
    """Two grouped matmuls give the reference's per-expert loop, with one expert taking most pairs,
    some none, and a rank holding only some experts."""
    tokens, top_k = MOE_STEPS[step]
    g = torch.Generator().manual_seed(9)
    x = torch.randn(tokens, 48, generator=g).to(dtype)
    logits = 2 * torch.randn(tokens, 8, generator=g)
    logits[:, 3] += 6
    logits[:, :2] -= 40
    w13 = (torch.randn(8, 64, 48, generator=g) * 48 ** -0.5).to(dtype)
    w2 = (torch.randn(8, 48, 32, generator=g) * 32 ** -0.5).to(dtype)
    tol = TOLERANCE[dtype]
    expected = reference.fused_moe(x, logits, w13, w2, top_k, True)
    torch.testing.assert_close(kernels.fused_moe(x, logits, w13, w2, top_k, True), expected, atol=tol, rtol=tol)
    expert_map = torch.tensor([-1, 0, -1, 1, -1, 2, -1, 3], dtype=torch.int32)
    here = expert_map >= 0
    expected = reference.fused_moe(x, logits, w13[here], w2[here], top_k, False, expert_map=expert_map)
    got = kernels.fused_moe(x, logits, w13[here], w2[here], top_k, False, expert_map=expert_map)
    torch.testing.assert_close(got, expected, atol=tol, rtol=tol)
