"""Quantization: every declared method and type against dequantize-then-matmul.

``dequantize`` must give the reference's dense weight; ``apply(load(w), x, bias)`` must equal
``x @ W.T + bias`` with that weight, in every dtype the platform supports. A method is free
to keep packed weights and run its own kernel: only the product is compared.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..compare import assert_close, dtype_name
from ..params import case, parametrize, unsupported
from ..quant_data import random_gguf, reference_dequantize, unsupported_reason

ROWS, COLS = 64, 512  # COLS: two K-quant super-blocks per row


def pytest_generate_tests(metafunc):
    parametrize(metafunc, _dequantize if metafunc.function.__name__ == "test_dequantize" else _apply)


def _types(target, with_dtypes: bool):
    if not target.quantization_methods:
        yield unsupported("none", "no quantization methods registered (quantized checkpoints cannot load)")
    for method in target.quantization_methods:
        for qtype in sorted(method.supported_qtypes):
            name = f"{method.name}-{qtype}"
            reason = unsupported_reason(method.name, qtype)
            if reason:
                yield unsupported(name, f"not checked: {reason}")
            elif not with_dtypes:
                yield case((method, qtype, torch.float32), name)
            else:
                yield from (case((method, qtype, d), f"{name}-{dtype_name(d)}") for d in target.platform.supported_dtypes)


def _dequantize(target):
    return _types(target, with_dtypes=False)


def _apply(target):
    return _types(target, with_dtypes=True)


def test_dequantize(case):
    method, qtype, dtype = case
    raw = random_gguf(qtype, ROWS, COLS, seed=1)
    expected = reference_dequantize(raw)
    got = method().dequantize(raw, dtype)
    assert_close(got, expected, dtype, f"{method.__name__}.dequantize({method.name} {qtype} [{ROWS}, {COLS}])",
                 scale=expected.abs().max().item())


def test_apply(case, target):
    method, qtype, dtype = case
    raw = random_gguf(qtype, ROWS, COLS, seed=2)
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(5, COLS, generator=generator).to(dtype)
    bias = torch.randn(ROWS, generator=generator).to(dtype)
    # Reference: the exact weight, products in float64, one rounding to the dtype at the end.
    expected = F.linear(x.double(), reference_dequantize(raw).double(), bias.double()).to(dtype)
    instance = method()
    weight = instance.load(raw, dtype, target.device)
    got = instance.apply(weight, x.to(target.device), bias.to(target.device))
    assert_close(got, expected, dtype, f"{method.__name__}.apply(load({method.name} {qtype} [{ROWS}, {COLS}]), x [5, {COLS}], bias) "
                 f"vs x @ dequantize(w).T + bias", scale=expected.float().abs().max().item())
