"""Linear layers whose weights may come from a quantization method, and fused projections."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...platform import QuantizationMethod


class Linear(nn.Module):
    """y = x @ W.T + b. ``W`` is a dense parameter, or what ``quant_method.load`` returned.

    ``partitions`` lists the output sizes of fused projections (q/k/v, gate/up): a checkpoint
    that stores them apart loads each into its row range with :meth:`load_partition`.
    """

    def __init__(self, in_features: int, out_features: int | list[int], bias: bool = False):
        super().__init__()
        self.partitions = list(out_features) if isinstance(out_features, (list, tuple)) else [out_features]
        self.in_features, self.out_features = in_features, sum(self.partitions)
        self.weight = nn.Parameter(torch.empty(self.out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(self.out_features), requires_grad=False) if bias else None
        self.quant_method: QuantizationMethod | None = None
        self.quant_weight: Any = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant_method is not None:
            return self.quant_method.apply(self.quant_weight, x, self.bias)
        return F.linear(x, self.weight, self.bias)

    def partition_rows(self, index: int) -> slice:
        start = sum(self.partitions[:index])
        return slice(start, start + self.partitions[index])

    def load_partition(self, name: str, index: int, value: torch.Tensor) -> None:
        target = self.bias if name == "bias" else self.weight
        rows = self.partition_rows(index)
        if value.shape != target[rows].shape:
            raise ValueError(f"checkpoint {name} partition {index} has shape {tuple(value.shape)}, expected {tuple(target[rows].shape)}")
        target.data[rows] = value.to(target.dtype)
