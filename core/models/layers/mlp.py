"""Gated MLP: fused gate/up projection, gated activation through the platform op, down projection."""

from __future__ import annotations

import torch
from torch import nn

from ...platform import KernelSet
from ..parallel import TensorParallel
from .linear import Linear

# HF hidden_act names -> (op, approximate) ; "gelu_pytorch_tanh" is Gemma's default.
ACTIVATIONS = {
    "silu": ("silu_and_mul", None),
    "swish": ("silu_and_mul", None),
    "gelu": ("gelu_and_mul", "none"),
    "gelu_pytorch_tanh": ("gelu_and_mul", "tanh"),
    "gelu_tanh": ("gelu_and_mul", "tanh"),
    "gelu_new": ("gelu_and_mul", "tanh"),
}


class GatedMLP(nn.Module):
    """Under tensor parallelism a rank holds a share of the intermediate width; the down
    projection sums the shares, unless ``reduce`` is False (a caller that sums this output with
    other partial sums in one all-reduce: an MoE block's shared expert)."""

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str, ops: KernelSet, bias: bool = False,
                 tp: TensorParallel = TensorParallel(), reduce: bool = True):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unsupported activation {activation!r}; supported: {', '.join(ACTIVATIONS)}")
        first, end = tp.split(intermediate_size)
        sharded = tp.size > 1
        self.gate_up_proj = Linear(hidden_size, [end - first, end - first], ops, bias=bias,
                                   rows=[(first, end)] * 2 if sharded else None, stored=[intermediate_size] * 2)
        self.down_proj = Linear(end - first, hidden_size, ops, bias=bias, columns=(first, end) if sharded else None,
                                reduce=tp if reduce else None)
        op, self.approximate = ACTIVATIONS[activation]
        self.act = getattr(ops, op)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        hidden = self.act(gate_up) if self.approximate is None else self.act(gate_up, self.approximate)
        return self.down_proj(hidden)
