"""Comparing a platform's result with the reference, with failure messages that locate the fault."""

from __future__ import annotations

import torch

from .tolerances import tolerance


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def mismatch(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> str | None:
    """None when ``actual`` is within ``dtype``'s tolerance of ``expected``, else what is wrong.

    ``scale`` multiplies the absolute tolerance, for results whose magnitude is far from 1
    (a matmul's output grows with its inner dimension). NaN or inf where the reference is
    finite always counts as wrong.
    """
    if tuple(actual.shape) != tuple(expected.shape):
        return f"shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    if actual.dtype != expected.dtype:
        return f"dtype {dtype_name(actual.dtype)}, expected {dtype_name(expected.dtype)}"
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    tol = tolerance(dtype)
    error = (a - e).abs()
    bad = ~(error <= tol.atol * scale + tol.rtol * e.abs())  # written negated so NaN counts as bad
    if not bad.any():
        return None
    worst = torch.where(bad, error.nan_to_num(nan=float("inf")), torch.zeros_like(error)).argmax()
    index = tuple(int(i) for i in torch.unravel_index(worst, a.shape))
    return (f"{int(bad.sum())} of {bad.numel()} values outside the {dtype_name(dtype)} tolerance "
            f"(atol {tol.atol * scale:.3g}, rtol {tol.rtol:.3g}); worst at index {index}: "
            f"got {a[index].item():.6g}, expected {e[index].item():.6g}")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str, scale: float = 1.0) -> None:
    """Raise ``AssertionError("<what>: <mismatch>")`` unless the two agree within tolerance."""
    problem = mismatch(actual, expected, dtype, scale)
    if problem is not None:
        raise AssertionError(f"{what}: {problem}")
