"""GGUF's integer block types kept packed on the CUDA platform (``CudaGgufMethod``: the WNA16 GEMM)
against the float64 product with the ``gguf`` package's dequantization: on a GPU, or on the CPU
under Triton's interpreter."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from runtime_conformance.quant_data import random_weight

from runtime.platform.gguf_groups import GGUF_GROUP_TYPES

wna16 = pytest.importorskip("runtime_triton.wna16")
from runtime_cuda.quant import CudaGgufMethod  # noqa: E402


@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["float16", "float32"])
@pytest.mark.parametrize("qtype", sorted(GGUF_GROUP_TYPES))
def test_gguf_block_types_multiply_packed(qtype, dtype, rows, device):
    raw, dense = random_weight("gguf", qtype, 48, 512, seed=7)
    method = CudaGgufMethod()
    weight = method.load(raw, dtype, device)
    bits, _ = GGUF_GROUP_TYPES[qtype]
    if bits == 8 and dtype == torch.float32:
        # float32 scales and offsets a group of 16 or 32 would weigh about as much as the dense weight
        assert isinstance(weight, torch.Tensor)
    else:
        assert isinstance(weight, wna16.WNA16Weight) and weight.bits == bits
        kept = sum(t.numel() * t.element_size() for t in (weight.qweight, weight.scales, weight.zeros, weight.offsets)
                   if t is not None)
        assert kept <= max(raw.data.nbytes, 48 * 512) * 7 / 6  # the checkpoint's bytes or int8's, not a dense copy
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 512, generator=g).to(dtype)
    bias = torch.randn(48, generator=g).to(dtype)
    expected = F.linear(x.double(), dense, bias.double())
    got = method.apply(weight, x.to(device), bias.to(device)).cpu()
    assert got.dtype == dtype and got.shape == (rows, 48)
    # Weights rounded to the activations' dtype once, products accumulated in float32.
    step = {torch.float16: 2 ** -10, torch.float32: 2 ** -20}[dtype]
    allowed = 2 * step * (x.double().abs() @ dense.abs().T + bias.double().abs()) + 1e-6
    assert bool(((got.double() - expected).abs() <= allowed).all()), ((got.double() - expected).abs() / allowed).max()
