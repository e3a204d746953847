"""int4_avx2.c (the compiled int4 matmul) against the float64 product of the weights it encodes,
in both column-block layouts of torch's packing, and how native.py falls back when it cannot
build it."""

from __future__ import annotations

import logging

import pytest
import torch

from runtime_cpu import int4, native

# Where a compiler and AVX2 are, the library must build: a broken source fails these tests.
needs_library = pytest.mark.skipif(not native.buildable(), reason="no C compiler or no AVX2: torch's kernels only")


@needs_library
def test_library_builds_where_it_can():
    assert native.library() is not None


def _packed(q: torch.Tensor, block: int) -> torch.Tensor:
    """``q`` [n, k] 0..15 in torch's CPU int4 layout with ``block``-column blocks: per block and
    input column, byte j holds column j (low nibble) and column j + block / 2 (high)."""
    n, k = q.shape
    by_input = q.view(n // block, block, k).transpose(1, 2).to(torch.uint8)
    return (by_input[..., :block // 2] | (by_input[..., block // 2:] << 4)).contiguous().view(n, k // 2)


def _weight(n: int, k: int, group: int, block: int, seed: int) -> tuple[int4.Int4Weight, torch.Tensor]:
    """A random packed weight and its float64 value (from the bfloat16 scales the kernel reads)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.int32)
    scales_and_zeros = (torch.randn(k // group, n, 2, generator=gen) * torch.tensor([0.05, 0.2])).to(torch.bfloat16)
    scale, zero = (part.double().T.repeat_interleave(group, dim=1) for part in scales_and_zeros.unbind(-1))
    return int4.Int4Weight(_packed(q, block), scales_and_zeros, group), (q.double() - 8) * scale + zero


def _bound(x: torch.Tensor, exact: torch.Tensor, group: int) -> torch.Tensor:
    """How far the kernel may be from ``x @ exact.T``: each activation rounded to int16 steps of
    its group's largest magnitude / 32767 (half a step each), the rest float32 rounding."""
    half_step = x.double().abs().view(len(x), -1, group).amax(-1).repeat_interleave(group, dim=1) / 65534
    return half_step @ exact.abs().T + 1e-6 * (x.double().abs() @ exact.abs().T)


@needs_library
@pytest.mark.parametrize("block", [32, 64])
@pytest.mark.parametrize("n, k, group", [(64, 256, 32), (192, 512, 64), (128, 384, 128), (64, 512, 256)])
def test_native_product_is_the_float64_product(block, n, k, group):
    """Every row count (the kernel tiles rows in pairs) gives the float64 product within the
    rounding of activations to int16 (2**-16 of their group's largest) and of float32 group
    sums; each row is bitwise its one-row result, so batches never change a row. A wrong nibble,
    column, scale or offset is off by a quantization step or more (2**-4 of a weight's range)."""
    weight, exact = _weight(n, k, group, block, seed=n + k + group + block)
    x = torch.randn(7, k, generator=torch.Generator().manual_seed(1)) * torch.logspace(-2, 2, k)[torch.randperm(k, generator=torch.Generator().manual_seed(2))]
    alone = torch.cat([int4._native_matmul(weight, x[i:i + 1], block) for i in range(len(x))])
    for count in (1, 2, 3, 7):
        out = int4._native_matmul(weight, x[:count], block)
        error = (out.double() - x[:count].double() @ exact.T).abs()
        bound = _bound(x[:count], exact, group)
        assert bool((error <= bound).all()), (error / bound).max()
        assert torch.equal(out, alone[:count])


@needs_library
def test_native_product_propagates_nan_and_inf():
    """A non-finite activation makes its row's outputs NaN, as a float matmul's would be; other
    rows are untouched."""
    weight, exact = _weight(64, 256, 32, 32, seed=9)
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(3))
    x[0, 5], x[2, 200] = float("nan"), float("inf")
    out = int4._native_matmul(weight, x, 32)
    assert bool(out[0].isnan().all()) and bool(out[2].isnan().all())
    error = (out[1].double() - x[1].double() @ exact.T).abs()
    assert bool((error <= _bound(x[1:2], exact, 32)[0]).all())


@needs_library
def test_native_product_of_a_strided_bfloat16_input():
    """Activations arrive as the model has them: a bfloat16, non-contiguous view is multiplied as
    its float32 values."""
    weight, exact = _weight(64, 256, 32, 32, seed=5)
    x = torch.randn(256, 3, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16).T
    out = int4._native_matmul(weight, x, 32)
    assert bool(((out.double() - x.double() @ exact.T).abs() <= _bound(x, exact, 32)).all())


def test_no_library_when_turned_off(monkeypatch):
    monkeypatch.setenv("RUNTIME_CPU_NATIVE", "0")
    native.library.cache_clear()
    try:
        assert native.library() is None
    finally:
        native.library.cache_clear()


def test_a_failing_compiler_leaves_torch_kernel(monkeypatch, tmp_path, caplog):
    """A compiler that fails gives no library and one warning with its message; int4.matmul then
    multiplies on torch's kernel (bfloat16 rounding, not the float32 kernel's exactness)."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.setenv("RUNTIME_CACHE_DIR", str(tmp_path))
    script = tmp_path / "cc"
    script.write_text("#!/bin/sh\necho 'cc: error: unrecognized option' >&2\nexit 1\n")
    script.chmod(0o755)
    monkeypatch.setenv("CC", str(script))
    native.library.cache_clear()
    int4._native_preferred.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=native.__name__):
            assert native.library() is None
        assert "unrecognized option" in caplog.text
        assert not int4._native_preferred()
        assert not list((tmp_path / "native").glob("*.so"))
    finally:
        native.library.cache_clear()
        int4._native_preferred.cache_clear()


@needs_library
def test_library_is_built_once_into_the_cache(monkeypatch, tmp_path):
    """A second process finds the built library by its key and compiles nothing."""
    monkeypatch.setenv("RUNTIME_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    native.library.cache_clear()
    try:
        assert native.library() is not None
        built = list((tmp_path / "native").glob("kernels_avx2-*.so"))
        assert len(built) == 1
        native.library.cache_clear()
        monkeypatch.setattr(native, "_compile", lambda *args: pytest.fail("compiled again"))
        assert native.library() is not None
    finally:
        native.library.cache_clear()
