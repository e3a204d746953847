"""Comparing a platform's result with the reference, with failure messages that locate the fault.

Two rules, both from :mod:`runtime_conformance.tolerances`: every value within the dtype's
elementwise tolerance of the exact result rounded once (:func:`mismatch`), and the error as a
whole no larger than a stated factor times the error of a correct implementation in the same
dtype (:func:`precision`). Each comparison's statistics go to the :func:`recording` in effect,
from which the report keeps each check's closest call.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import asdict, dataclass
from typing import Iterator

import torch

from .tolerances import PRECISION, tolerance


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass
class Margin:
    """One comparison's statistics. Errors are in units of the dtype's epsilon relative to the
    exact value (see :func:`precision`); ``used`` near 1 is a result close to failing."""

    what: str
    dtype: str
    tolerance_used: float
    """The largest ratio of a value's error to its elementwise tolerance (over 1 fails)."""
    mean: float
    max: float
    baseline_mean: float
    """The mean error of the reference computed in the dtype (accumulating in float32)."""
    baseline_max: float
    limit_mean: float
    limit_max: float

    @property
    def used(self) -> float:
        """The largest fraction of a limit this comparison used (over 1 fails)."""
        return max(self.tolerance_used, self.mean / self.limit_mean, self.max / self.limit_max)

    def as_dict(self) -> dict:
        return {**{k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()},
                "used": round(self.used, 4)}


_RECORDING: contextvars.ContextVar[list[Margin] | None] = contextvars.ContextVar("margins", default=None)


@contextlib.contextmanager
def recording() -> Iterator[list[Margin]]:
    """Collect the :class:`Margin` of every comparison made inside the block."""
    margins: list[Margin] = []
    token = _RECORDING.set(margins)
    try:
        yield margins
    finally:
        _RECORDING.reset(token)


def _as64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float64)


def _elementwise(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float):
    a, e = _as64(actual), _as64(expected)
    tol = tolerance(dtype)
    error = (a - e).abs()
    allowed = tol.atol * scale + tol.rtol * e.abs()
    return a, e, error, allowed


def _mismatch_of(a, e, error, allowed, dtype: torch.dtype, scale: float) -> str | None:
    bad = ~(error <= allowed)  # written negated so NaN counts as bad
    if not bad.any():
        return None
    tol = tolerance(dtype)
    worst = torch.where(bad, error.nan_to_num(nan=float("inf")), torch.zeros_like(error)).argmax()
    index = tuple(int(i) for i in torch.unravel_index(worst, a.shape))
    return (f"{int(bad.sum())} of {bad.numel()} values outside the {dtype_name(dtype)} tolerance "
            f"(atol {tol.atol * scale:.3g}, rtol {tol.rtol:.3g}); worst at index {index}: "
            f"got {a[index].item():.6g}, expected {e[index].item():.6g}")


def _layout(actual: torch.Tensor, expected: torch.Tensor) -> str | None:
    if tuple(actual.shape) != tuple(expected.shape):
        return f"shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    if actual.dtype != expected.dtype:
        return f"dtype {dtype_name(actual.dtype)}, expected {dtype_name(expected.dtype)}"
    return None


def mismatch(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> str | None:
    """None when ``actual`` is within ``dtype``'s tolerance of ``expected``, else what is wrong.

    ``scale`` multiplies the absolute tolerance, for results whose magnitude is far from 1
    (a matmul's output grows with its inner dimension). NaN or inf where the reference is
    finite always counts as wrong.
    """
    problem = _layout(actual, expected)
    if problem is not None:
        return problem
    return _mismatch_of(*_elementwise(actual, expected, dtype, scale), dtype, scale)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str, scale: float = 1.0) -> None:
    """Raise ``AssertionError("<what>: <mismatch>")`` unless the two agree within tolerance."""
    problem = mismatch(actual, expected, dtype, scale)
    if problem is not None:
        raise AssertionError(f"{what}: {problem}")


def _units(error: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype, floor: float) -> torch.Tensor:
    """``error`` in units of ``dtype``'s epsilon relative to ``max(|exact|, floor * RMS(exact))``."""
    rms = exact.pow(2).mean().sqrt().item()
    reference = exact.abs().clamp(min=max(floor * rms, torch.finfo(torch.float64).tiny))
    return (error / (torch.finfo(dtype).eps * reference)).nan_to_num(nan=float("inf"))


def precision(actual: torch.Tensor, exact: torch.Tensor, baseline: torch.Tensor, dtype: torch.dtype, what: str,
              floor: float = 1.0, scale: float = 1.0) -> str | None:
    """Compare ``actual`` with ``exact`` (float64) by both rules; None when it passes, else what is wrong.

    ``baseline`` is the reference computed in ``dtype`` from the same inputs; ``floor`` is where
    relative errors stop (see :data:`runtime_conformance.tolerances.ELEMENTWISE_FLOOR`); ``scale``
    multiplies the elementwise absolute tolerance as in :func:`mismatch`. The statistics are
    recorded whether or not it passes.
    """
    problem = _layout(actual, baseline)
    if problem is not None:
        return problem
    e = _as64(exact)
    a, rounded, error, allowed = _elementwise(actual, e.to(dtype), dtype, scale)
    cand = _units((a - e).abs(), e, dtype, floor)
    base = _units((_as64(baseline) - e).abs(), e, dtype, floor)
    rule = PRECISION[dtype]
    margin = Margin(what, dtype_name(dtype), (error / allowed).nan_to_num(nan=float("inf")).max().item(),
                    cand.mean().item(), cand.max().item(), base.mean().item(), base.max().item(),
                    rule.mean_factor * max(base.mean().item(), rule.min_mean),
                    rule.max_factor * max(base.max().item(), rule.min_max))
    margins = _RECORDING.get()
    if margins is not None:
        margins.append(margin)
    problems = [p for p in [_mismatch_of(a, rounded, error, allowed, dtype, scale)] if p]
    if margin.mean > margin.limit_mean or margin.max > margin.limit_max:
        worst = tuple(int(i) for i in torch.unravel_index(cand.argmax(), cand.shape))
        problems.append(
            f"error {margin.mean:.3g} eps units on average, {margin.max:.3g} at most (at index {worst}: got "
            f"{a[worst].item():.6g}, exact {e[worst].item():.6g}); a correct {dtype_name(dtype)} implementation "
            f"makes {margin.baseline_mean:.3g} and {margin.baseline_max:.3g}, limits {margin.limit_mean:.3g} and "
            f"{margin.limit_max:.3g} ({rule.mean_factor:g}x and {rule.max_factor:g}x)")
    return "; ".join(problems) or None


def assert_precise(actual: torch.Tensor, exact: torch.Tensor, baseline: torch.Tensor, dtype: torch.dtype, what: str,
                   floor: float = 1.0, scale: float = 1.0) -> None:
    """Raise ``AssertionError("<what>: <problems>")`` unless :func:`precision` passes."""
    problem = precision(actual, exact, baseline, dtype, what, floor, scale)
    if problem is not None:
        raise AssertionError(f"{what}: {problem}")
