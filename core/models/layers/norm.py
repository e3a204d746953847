"""RMSNorm through the platform's kernels."""

from __future__ import annotations

import torch
from torch import nn

from ...platform import KernelSet


class RMSNorm(nn.Module):
    """RMSNorm; ``forward(x, residual)`` also adds the residual first and returns both.

    ``unit_offset`` is Gemma's variant, x * (1 + w): folded into the weight after loading.
    """

    def __init__(self, size: int, eps: float, ops: KernelSet, unit_offset: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)
        self.eps, self.ops, self.unit_offset = eps, ops, unit_offset

    def finish_loading(self) -> None:
        if self.unit_offset:
            self.weight.data += 1.0

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return self.ops.rms_norm(x, self.weight, self.eps)
        return self.ops.fused_add_rms_norm(x, residual, self.weight, self.eps)
