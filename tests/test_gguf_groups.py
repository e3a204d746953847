"""GGUF block types unpacked into scales, zero points and offsets a group
(``runtime.platform.gguf_groups``) against the ``gguf`` package's own dequantization."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize
from runtime_conformance.quant_data import random_gguf

from runtime.platform.gguf_groups import GGUF_GROUP_TYPES, group_quant


@pytest.mark.parametrize("qtype", sorted(GGUF_GROUP_TYPES))
def test_unpacked_groups_dequantize_as_the_gguf_package(qtype):
    # Quantized from random floats where the package can quantize, random bytes (every scale,
    # minimum and bit pattern) for the K-quants.
    raw = random_gguf(qtype, 6, 768, seed=4)
    expected = dequantize(np.asarray(raw.data), GGMLQuantizationType[qtype]).reshape(raw.shape)
    data = group_quant(raw)
    bits, group = GGUF_GROUP_TYPES[qtype]
    assert (data.bits, data.group_size) == (bits, group)
    assert data.qweight.dtype == torch.uint8 and int(data.qweight.max()) < 2 ** bits
    # One zero point for the whole type: the kernels take it as a constant.
    assert bool((data.zeros == data.zeros.flatten()[0]).all())
    assert data.zeros.shape == data.scales.shape == (6, 768 // group)
    # Scales and minimums are float16 times small integers, exact in float32 as the package computes.
    got = data.dequantize(torch.float64)
    torch.testing.assert_close(got, torch.from_numpy(expected.astype(np.float64)), rtol=2e-7, atol=0)


def test_rows_and_columns_keep_their_offsets():
    raw = random_gguf("Q4_K", 4, 512, seed=5)
    data = group_quant(raw)
    whole = data.dequantize(torch.float64)
    torch.testing.assert_close(data[1:3].dequantize(torch.float64), whole[1:3], rtol=0, atol=0)
    torch.testing.assert_close(data.columns(256, 512).dequantize(torch.float64), whole[:, 256:], rtol=0, atol=0)
