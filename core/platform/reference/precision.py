"""The precision the reference ops compute in."""

import torch


def wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32, or as it is when wider: reduced-precision inputs accumulate in float32 as
    a device kernel would, while float64 inputs stay float64, so the conformance suite gets an
    exact result from the same reference code."""
    return t.to(torch.promote_types(t.dtype, torch.float32))
