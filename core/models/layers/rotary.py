"""Rotary embedding: builds the cos/sin cache once, applies it through the platform op."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...platform import KernelSet
from ...platform.reference.rotary import build_cos_sin_cache


def rope_settings(config: Any) -> tuple[float, dict | None, float]:
    """(theta, rope_scaling dict or None, partial_rotary_factor) across transformers 4.x and 5.x configs."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    theta = params.pop("rope_theta", None) or getattr(config, "rope_theta", None) or 10000.0
    partial = params.pop("partial_rotary_factor", None) or getattr(config, "partial_rotary_factor", None) or 1.0
    scaling = params or getattr(config, "rope_scaling", None)
    if scaling and scaling.get("rope_type", scaling.get("type")) in (None, "default"):
        scaling = None
    return float(theta), scaling, float(partial)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, config: Any, max_positions: int, ops: KernelSet, is_neox: bool = True):
        super().__init__()
        theta, scaling, partial = rope_settings(config)
        rotary_dim = int(head_dim * partial)
        positions = max(max_positions, int(getattr(config, "max_position_embeddings", 0) or 0))
        self.register_buffer("cos_sin_cache", build_cos_sin_cache(rotary_dim, theta, positions, scaling), persistent=False)
        self.ops, self.is_neox = ops, is_neox

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ops.rotary_embedding(positions, q, k, self.cos_sin_cache, self.is_neox)
