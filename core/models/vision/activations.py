"""The activations vision towers name in their configs, as modules."""

from __future__ import annotations

import torch
from torch import nn


class QuickGELU(nn.Module):
    """CLIP's and Qwen2-VL's x * sigmoid(1.702 x)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def activation(name: str) -> nn.Module:
    if name == "quick_gelu":
        return QuickGELU()
    if name == "gelu":
        return nn.GELU()
    if name in ("gelu_pytorch_tanh", "gelu_new"):
        return nn.GELU(approximate="tanh")
    if name == "silu":
        return nn.SiLU()
    raise ValueError(f"vision activation {name!r} is not supported: use quick_gelu, gelu, gelu_pytorch_tanh or silu")
