"""LoRA shrink/expand with one adapter slot per token (slot -1: no adapter), ``lora_add``
(contract 1.5), the pair for every partition of a fused projection in one call, and
``linear_lora`` (contract 1.14), the projection and its adapters in one call."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .linear import linear
from .precision import wide


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, slots: torch.Tensor, scale: float) -> torch.Tensor:
    """x [T, in], lora_a [S, r, in], slots [T] -> [T, r] = scale * x @ lora_a[slot].T (0 where slot < 0)."""
    valid = slots >= 0
    a = lora_a[slots.clamp(min=0)]
    out = torch.einsum("ti,tri->tr", wide(x), wide(a)) * scale
    return (out * valid.unsqueeze(-1)).to(x.dtype)


def lora_expand(shrunk: torch.Tensor, lora_b: torch.Tensor, slots: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """shrunk [T, r], lora_b [S, out, r], base [T, out] -> base + shrunk @ lora_b[slot].T (base where slot < 0)."""
    valid = slots >= 0
    b = lora_b[slots.clamp(min=0)]
    delta = torch.einsum("tr,tor->to", wide(shrunk), wide(b)) * valid.unsqueeze(-1)
    return (wide(base) + delta).to(base.dtype)


def lora_add(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, slots: torch.Tensor,
             slices: Sequence[int], scale: float) -> torch.Tensor:
    """Adds every token's adapter delta to ``y``, the output of a projection fused of ``len(slices)``
    partitions, in place; returns ``y``.

    y [T, out] (``out = sum(slices)``; partition i is columns ``sum(slices[:i])`` on, ``slices[i]``
    wide), x [T, in], lora_a [S, n * r, in] (partition i's A is rows ``i * r`` to ``(i + 1) * r``),
    lora_b [S, out, r] (partition i's B is its columns' rows), slots [T]. Per partition,
    ``y_i += lora_expand(lora_shrink(x, A_i, slots, scale), B_i, slots, y_i) - y_i``: the shrunk
    values rounded to x's dtype, each output once to y's. Rows of tokens with slot -1 are left as
    they are.
    """
    return lora_add_per_slice(lora_shrink, lora_expand, y, x, lora_a, lora_b, slots, slices, scale)


def lora_add_per_slice(shrink: Callable, expand: Callable, y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor,
                       lora_b: torch.Tensor, slots: torch.Tensor, slices: Sequence[int], scale: float) -> torch.Tensor:
    """``lora_add`` from a ``lora_shrink`` and a ``lora_expand``: one pair of calls per partition, on
    views of the weights and of ``y``. What a platform that registers only the pair (a plugin written
    before contract 1.5) runs."""
    rank, start = lora_b.shape[2], 0
    if lora_a.shape[1] != len(slices) * rank or lora_b.shape[1] != sum(slices):
        raise ValueError(f"lora_add: lora_a {list(lora_a.shape)} and lora_b {list(lora_b.shape)} do not hold "
                         f"partitions {list(slices)} of rank {rank}")
    for i, width in enumerate(slices):
        part = y[:, start:start + width]
        shrunk = shrink(x, lora_a[:, i * rank:(i + 1) * rank], slots, scale)
        part.copy_(expand(shrunk, lora_b[:, start:start + width], slots, part))
        start += width
    return y


def linear_lora(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, slots: torch.Tensor, slices: Sequence[int], scale: float) -> torch.Tensor:
    """``linear(x, weight, bias)`` with every token's adapter delta added: ``lora_add`` on the
    projection's output (its arguments after ``bias``). One call for both, so that a platform can
    add the delta inside the projection's own kernel; one that does not register it runs its
    ``linear`` and then its ``lora_add``."""
    return linear_lora_from(linear, lora_add, x, weight, bias, lora_a, lora_b, slots, slices, scale)


def linear_lora_from(linear_op: Callable, lora_add_op: Callable, x: torch.Tensor, weight: torch.Tensor,
                     bias: torch.Tensor | None, lora_a: torch.Tensor, lora_b: torch.Tensor, slots: torch.Tensor,
                     slices: Sequence[int], scale: float) -> torch.Tensor:
    """``linear_lora`` from a platform's ``linear`` and ``lora_add``, one after the other."""
    return lora_add_op(linear_op(x, weight, bias), x, lora_a, lora_b, slots, slices, scale)
