"""Kernels: every kernel the platform registers against the core's reference op, in every dtype
the platform supports. An op it does not register runs the reference itself: reported, not tested."""

from __future__ import annotations

import torch

from runtime.platform import AttentionBackend
from runtime.platform.reference import OPS

from ..compare import dtype_name
from ..kernel_checks import CHECKS, DTYPE_INDEPENDENT, check_copy_blocks, check_swap_blocks
from ..params import case, parametrize, unsupported


def pytest_generate_tests(metafunc):
    parametrize(metafunc, _kernels)


def _kernels(target):
    for op in OPS:
        kernels = [k for k in target.kernels if k.op == op]
        if not kernels:
            yield unsupported(op, f"{op} not registered: the platform runs the core's reference implementation")
        dtypes = [torch.float32] if op in DTYPE_INDEPENDENT else target.platform.supported_dtypes
        for index, kernel in enumerate(kernels):
            name = op if len(kernels) == 1 else f"{op}#{index}-{kernel.fn.__module__}"
            yield from (case((kernel, dtype), f"{name}-{dtype_name(dtype)}") for dtype in dtypes)


def test_kernel(case, target):
    kernel, dtype = case
    generator = torch.Generator().manual_seed(0)
    if kernel.op in ("copy_blocks", "swap_blocks"):
        backends = target.backends or [AttentionBackend]
        layouts = [(lambda n, b=b: tuple(b.kv_cache_shape(n, 4, 2, 8)), b.kv_cache_block_dim) for b in backends]
        check = check_copy_blocks if kernel.op == "copy_blocks" else check_swap_blocks
        check(kernel.fn, dtype, target.device, generator, layouts)
    else:
        CHECKS[kernel.op](kernel.fn, dtype, target.device, generator)
