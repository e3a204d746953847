"""Batch invariance (contract 1.10, ``--deterministic``): every kernel, quantization method and
attention backend of the platform that claims ``batch_invariant`` computes a row bitwise the same
alone and inside batches of 2 to 64 random rows (see :mod:`runtime_conformance.batch_invariance`).
A platform without ``supports_deterministic`` has nothing to prove here."""

from __future__ import annotations

import torch
from runtime.platform import Kernel, reference

from ..batch_invariance import RowOp, assert_batch_invariant, assert_chunking_invariant, attention_row_op, row_ops
from ..compare import dtype_name
from ..params import case, parametrize, unsupported
from ..quant_data import random_weight, unsupported_reason

COLS = 512


def pytest_generate_tests(metafunc):
    make = {"test_kernel_batch_invariant": _kernels, "test_quantization_batch_invariant": _methods,
            "test_attention_batch_invariant": _backends}
    parametrize(metafunc, make[metafunc.function.__name__])


def _claims(target):
    return target.platform is not None and target.platform.supports_deterministic


def _kernels(target):
    checked = row_ops(None, torch.float32, None)
    claimed = [k for k in target.kernels if k.batch_invariant and k.op in checked]
    if _claims(target):
        # Ops the platform leaves to the core's reference run it on the platform's device under
        # --deterministic: torch's own kernels there must keep rows apart too.
        own = {k.op for k in claimed}
        claimed += [Kernel(target.platform.name, op, reference.OPS[op], batch_invariant=True)
                    for op in sorted(reference.BATCH_INVARIANT & checked.keys() - own)]
    if not _claims(target) or not claimed:
        yield unsupported("none", "the platform claims no batch-invariant row kernel (--deterministic)")
        return
    for kernel in claimed:
        for dtype in target.platform.supported_dtypes:
            yield case((kernel, dtype), f"{kernel.op}-{kernel.fn.__module__}-{dtype_name(dtype)}")


def _methods(target):
    claimed = [m for m in target.quantization_methods if m.batch_invariant]
    if not _claims(target) or not claimed:
        yield unsupported("none", "no quantization method claims batch invariance (--deterministic)")
        return
    for method in claimed:
        for qtype in sorted(method.supported_qtypes):
            if unsupported_reason(method.name, qtype) is None:
                yield case((method, qtype), f"{method.name}-{qtype}")
        if method.quantizes_dense:
            yield case((method, None), f"{method.name}-quantize")


def _backends(target):
    claimed = [b for b in target.backends if b.batch_invariant]
    if not _claims(target) or not claimed:
        yield unsupported("none", "no attention backend claims batch invariance (--deterministic)")
        return
    for backend in claimed:
        for dtype in backend.supported_dtypes:
            if dtype in target.platform.supported_dtypes:
                yield case((backend, dtype), f"{backend.name}-{dtype_name(dtype)}")


def test_kernel_batch_invariant(case, target):
    kernel, dtype = case
    op = row_ops(kernel.fn, dtype, target.device)[kernel.op]
    assert_batch_invariant(op, f"{kernel.op} ({kernel.fn.__module__}, {dtype_name(dtype)})")


def test_quantization_batch_invariant(case, target):
    method_cls, qtype = case
    method = method_cls()
    method.deterministic = True
    device = target.device
    if qtype is None:
        weight = method.quantize(torch.randn(320, COLS, generator=torch.Generator().manual_seed(2)).to(device))
    else:
        raw, _ = random_weight(method.name, qtype, 64, COLS, seed=1)
        weight = method.load(raw, torch.float32, device)
    op = RowOp(lambda n, g: {"x": torch.randn(n, COLS, generator=g)},
               lambda a, r: method.apply(weight, a["x"][r].to(device)))
    assert_batch_invariant(op, f"{method_cls.__name__}.apply ({method.name} {qtype or 'quantized at load'})")


def test_attention_batch_invariant(case, target):
    backend_cls, dtype = case
    assert_batch_invariant(attention_row_op(backend_cls, dtype, target.device), f"{backend_cls.name} ({dtype_name(dtype)})")
    assert_chunking_invariant(backend_cls, dtype, target.device)
