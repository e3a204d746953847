"""Quantization: every declared method and type against dequantize-then-matmul.

``dequantize`` must give the reference's dense weight; ``apply(load(w), x, bias)`` must equal
``x @ W.T + bias`` with that weight, in every dtype the platform supports, within the precision
the method declares for the type (``QuantizationMethod.precision``: exact, products in bfloat16,
or the weight requantized to int8/FP8). A method is free to keep packed weights and run its own
kernel: only the product is compared, and a weight kept packed must take about the checkpoint's
bytes (or int8's), not a dense copy's. GGUF weights come from the gguf package's quantizers,
GPTQ/AWQ/compressed-tensors/FP8 ones are random integers, scales, zero points and act-order
groups in the unpacked form the loader hands over (``runtime.platform.packed``).

A method that quantizes dense weights (``quantizes_dense``, ``--quantization NAME``) is checked
on its own rounding: ``apply(quantize(W), x, bias)`` against ``x @ W.T + bias`` in float64
with the original ``W``, within what rounding to the stored format can explain (see
:func:`~runtime_conformance.tolerances.quantized_matmul_tolerance`), and the stored weight must
take fewer bytes than the dense one.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

from ..compare import assert_close, dtype_name
from ..params import case, parametrize, unsupported
from ..quant_data import random_dense, random_weight, unsupported_reason
from ..tolerances import QUANTIZED_FORMATS, quantized_matmul_tolerance, tolerance

ROWS, COLS = 64, 512  # COLS: two K-quant super-blocks per row


def pytest_generate_tests(metafunc):
    make = {"test_dequantize": _dequantize, "test_apply": _apply, "test_quantize": _quantize}
    parametrize(metafunc, make[metafunc.function.__name__])


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


def _quantize(target):
    methods = [m for m in target.quantization_methods if m.quantizes_dense]
    if not methods:
        yield unsupported("none", "no method quantizes dense weights (--quantization offers nothing)")
    for method in methods:
        yield from (case((method, d), f"{method.name}-{dtype_name(d)}") for d in target.platform.supported_dtypes)


def _dequantize(target):
    return _types(target, with_dtypes=False)


def _apply(target):
    return _types(target, with_dtypes=True)


def test_dequantize(case):
    method, qtype, dtype = case
    raw, expected = random_weight(method.name, qtype, ROWS, COLS, seed=1)
    expected = expected.float()
    got = method().dequantize(raw, dtype)
    assert_close(got, expected, dtype, f"{method.__name__}.dequantize({method.name} {qtype} [{ROWS}, {COLS}])",
                 scale=expected.abs().max().item())


def test_apply(case, target):
    method, qtype, dtype = case
    raw, dense = random_weight(method.name, qtype, ROWS, COLS, seed=2)
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(5, COLS, generator=generator).to(dtype)
    bias = torch.randn(ROWS, generator=generator).to(dtype)
    # Reference: the exact weight, products in float64, one rounding to the dtype at the end.
    exact = F.linear(x.double(), dense, bias.double())
    expected = exact.to(dtype)
    instance = method()
    weight = instance.load(raw, dtype, target.device)
    got = instance.apply(weight, x.to(target.device), bias.to(target.device))
    what = (f"{method.__name__}.apply(load({method.name} {qtype} [{ROWS}, {COLS}]), x [5, {COLS}], bias) "
            f"vs x @ dequantize(w).T + bias")
    precision = instance.precision(qtype)
    if precision is None:
        assert_close(got, expected, dtype, what, scale=expected.float().abs().max().item())
    elif precision in QUANTIZED_FORMATS:
        _assert_within_requantization(got.cpu(), exact, x.double(), dense, precision, dtype, what)
    else:  # products computed in a narrower float type: that type's tolerance
        narrow = max(dtype, precision, key=lambda d: tolerance(d).rtol)
        assert_close(got.to(dtype), exact.to(dtype), narrow, f"{what} (computed in {dtype_name(precision)})",
                     scale=exact.abs().max().item())
    _assert_packed_footprint(weight, raw, what)


def _assert_within_requantization(got, exact, x, dense, precision, dtype, what):
    """``apply`` of a weight the method requantized to ``precision``: within what that rounding explains."""
    rounding = tolerance(dtype)
    allowed = (quantized_matmul_tolerance(x, dense, precision) + rounding.atol * exact.abs().max()
               + rounding.rtol * exact.abs())
    error = (got.double() - exact).abs()
    bad = ~(error <= allowed)
    assert not bad.any(), (f"{what} (requantized to {dtype_name(precision)}): {int(bad.sum())} of {bad.numel()} values "
                           f"farther than that rounding explains; worst error / allowed "
                           f"{(error / allowed).max().item():.3g}")


def _assert_packed_footprint(weight, raw, what):
    """A weight the method keeps packed (``load`` gave no dense tensor) holds no more bytes than
    the checkpoint's own packing or int8 (whichever is larger), plus a sixth for scales and layout."""
    if isinstance(weight, torch.Tensor):
        return
    stored = sum(t.numel() * t.element_size() for t in _stored_tensors(weight))
    numel = raw.shape[0] * raw.shape[1]
    if isinstance(raw.data, np.ndarray):
        checkpoint = raw.data.nbytes
    else:
        checkpoint = numel * (1 if raw.qtype == "fp8_e4m3" else int(raw.qtype.removeprefix("int")) / 8)
    bound = max(checkpoint, numel) * 7 / 6
    assert stored <= bound, (f"{what}: the loaded weight keeps {stored} bytes, more than {bound:.0f} (the checkpoint "
                             f"packs it in {checkpoint:.0f}): it is not kept packed")


def _stored_tensors(stored) -> list[torch.Tensor]:
    """The tensors ``Linear.stored_bytes`` counts in what ``quantize`` returned."""
    if isinstance(stored, torch.Tensor):
        return [stored]
    if isinstance(stored, (list, tuple)):
        return [t for v in stored for t in _stored_tensors(v)]
    if dataclasses.is_dataclass(stored):
        return [t for f in dataclasses.fields(stored) for t in _stored_tensors(getattr(stored, f.name))]
    return []


def test_quantize(case, target):
    method, dtype = case
    weight = random_dense(ROWS, COLS, seed=4).to(dtype)
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(5, COLS, generator=generator).to(dtype)
    bias = torch.randn(ROWS, generator=generator).to(dtype)
    what = f"{method.__name__}.quantize({method.name}, {dtype_name(dtype)} [{ROWS}, {COLS}])"
    instance = method()
    stored = instance.quantize(weight.to(target.device))
    tensors = _stored_tensors(stored)
    if not tensors:
        raise AssertionError(f"{what} returned {type(stored).__name__} holding no tensors: Linear.stored_bytes "
                             "counts tensors, a tuple or a dataclass of them")
    payload = max(tensors, key=torch.Tensor.numel).dtype
    if payload not in QUANTIZED_FORMATS:
        raise AssertionError(f"{what} stores its values as {dtype_name(payload)}; runtime-conformance knows the "
                             f"precision of {', '.join(map(dtype_name, QUANTIZED_FORMATS))}")
    stored_bytes = sum(t.numel() * t.element_size() for t in tensors)
    dense_bytes = weight.numel() * weight.element_size()
    assert stored_bytes < dense_bytes, (f"{what} keeps {stored_bytes} bytes, no fewer than the dense weight's "
                                        f"{dense_bytes}: nothing is saved")
    got = instance.apply(stored, x.to(target.device), bias.to(target.device)).cpu()
    expected = F.linear(x.double(), weight.double(), bias.double())
    assert got.shape == expected.shape and got.dtype == dtype, (
        f"{what}: apply gave {dtype_name(got.dtype)} {tuple(got.shape)}, expected {dtype_name(dtype)} {tuple(expected.shape)}")
    quantized = quantized_matmul_tolerance(x.double(), weight.double(), payload)
    rounding = tolerance(dtype)
    allowed = quantized + rounding.atol * expected.abs().max() + rounding.rtol * expected.abs()
    error = (got.double() - expected).abs()
    bad = ~(error <= allowed)
    if bad.any():
        i, c = (int(v) for v in torch.unravel_index(torch.where(bad, error / allowed, 0).argmax(), error.shape))
        raise AssertionError(
            f"apply({what}), x [5, {COLS}], bias) vs x @ W.T + bias in float64: {int(bad.sum())} of {bad.numel()} "
            f"values farther than rounding W (and x) to {dtype_name(payload)} explains; worst at row {i}, output "
            f"channel {c}: got {got[i, c].item():.6g}, expected {expected[i, c].item():.6g}, allowed error "
            f"{allowed[i, c].item():.3g} (channel's largest |W| {weight[c].abs().max().item():.3g})")
