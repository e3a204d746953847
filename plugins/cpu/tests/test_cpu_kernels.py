"""The CPU plugin's kernels against the core's reference kernels on random inputs."""

from __future__ import annotations

import pytest
import torch

from runtime.platform import reference
from runtime.platform.reference import build_cos_sin_cache
from runtime_cpu import kernels

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_and_residual(dtype):
    torch.manual_seed(0)
    x, residual = (torch.randn(7, 96, dtype=dtype) * 3 for _ in range(2))
    weight = torch.randn(96, dtype=dtype)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(kernels.rms_norm(x, weight, 1e-5), reference.rms_norm(x, weight, 1e-5), atol=tol, rtol=tol)
    out, summed = kernels.fused_add_rms_norm(x, residual, weight, 1e-6)
    ref_out, ref_summed = reference.fused_add_rms_norm(x, residual, weight, 1e-6)
    torch.testing.assert_close(summed, ref_summed, atol=0, rtol=0)
    torch.testing.assert_close(out, ref_out, atol=tol, rtol=tol)


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
