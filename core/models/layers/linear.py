"""Linear layers whose weights may come from a quantization method, and fused projections."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from ...platform import KernelSet, QuantizationMethod


class Linear(nn.Module):
    """y = x @ W.T + b. ``W`` is a dense parameter, or what ``quant_method.load`` returned.

    ``partitions`` lists the output sizes of fused projections (q/k/v, gate/up): a checkpoint
    that stores them apart loads each into its row range with :meth:`load_partition`. A dense
    weight is multiplied by the platform's ``linear`` op.
    """

    def __init__(self, in_features: int, out_features: int | list[int], ops: KernelSet, bias: bool = False):
        super().__init__()
        self.ops = ops
        self.partitions = list(out_features) if isinstance(out_features, (list, tuple)) else [out_features]
        self.in_features, self.out_features = in_features, sum(self.partitions)
        self.weight = nn.Parameter(torch.empty(self.out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(self.out_features), requires_grad=False) if bias else None
        self.quant_method: QuantizationMethod | None = None
        self.quant_weight: Any = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant_method is not None:
            return self.quant_method.apply(self.quant_weight, x, self.bias)
        return self.ops.linear(x, self.weight, self.bias)

    @property
    def stored_bytes(self) -> int:
        """Bytes the weight occupies as stored: the dense parameter, or every tensor the method keeps."""
        return _tensor_bytes(self.quant_weight) if self.quant_method is not None else _tensor_bytes(self.weight)

    def partition_rows(self, index: int) -> slice:
        start = sum(self.partitions[:index])
        return slice(start, start + self.partitions[index])

    def load_partition(self, name: str, index: int, value: torch.Tensor) -> None:
        target = self.bias if name == "bias" else self.weight
        rows = self.partition_rows(index)
        if value.shape != target[rows].shape:
            raise ValueError(f"checkpoint {name} partition {index} has shape {tuple(value.shape)}, expected {tuple(target[rows].shape)}")
        target.data[rows] = value.to(target.dtype)


def _tensor_bytes(value: Any) -> int:
    """Bytes of the tensors in a method's stored weight: a tensor, a sequence or a dataclass of them."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    if dataclasses.is_dataclass(value):
        return sum(_tensor_bytes(getattr(value, f.name)) for f in dataclasses.fields(value))
    return 0
