"""Dense projection reference: torch's matmul in the input dtype."""

import torch
import torch.nn.functional as F


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ weight [N, K].T (+ bias [N]) -> [..., N] in x's dtype: every dense projection."""
    return F.linear(x, weight, bias)
