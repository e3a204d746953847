"""Gated activations: the input's last dimension is [gate | up], the output half as wide."""

import torch
import torch.nn.functional as F


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu_and_mul(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """``approximate`` is ``"none"`` (erf) or ``"tanh"``, as in torch.nn.functional.gelu."""
    gate, up = x.chunk(2, dim=-1)
    # Contiguous: on the CPU torch's gelu of a strided view of several rows takes another code path
    # than one row's (last-bit differences), and --deterministic runs this reference.
    return F.gelu(gate.contiguous(), approximate=approximate) * up
