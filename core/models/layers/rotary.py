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
    """``mrope_section`` (Qwen2-VL's M-RoPE): how many of the rotary frequencies follow the
    temporal, height and width positions; ``forward`` then also takes positions [3, T]."""

    def __init__(self, head_dim: int, config: Any, max_positions: int, ops: KernelSet, is_neox: bool = True,
                 mrope_section: tuple[int, ...] | None = None):
        super().__init__()
        theta, scaling, partial = rope_settings(config)
        rotary_dim = int(head_dim * partial)
        positions = max(max_positions, int(getattr(config, "max_position_embeddings", 0) or 0))
        self.register_buffer("cos_sin_cache", build_cos_sin_cache(rotary_dim, theta, positions, scaling), persistent=False)
        self.ops, self.is_neox = ops, is_neox
        if mrope_section is not None:
            if sum(mrope_section) != rotary_dim // 2:
                raise ValueError(f"mrope_section {list(mrope_section)} covers {sum(mrope_section)} frequencies, the "
                                 f"rotary dimension has {rotary_dim // 2}")
            axis = torch.repeat_interleave(torch.arange(len(mrope_section)), torch.tensor(mrope_section))
            # The cache row holds cos then sin of each frequency: both halves pick the same axis.
            self.register_buffer("mrope_axis", torch.cat([axis, axis]), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, q_norm: nn.Module | None = None,
                k_norm: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """q [T, H, D] and k [T, Hkv, D] rotated; with ``q_norm`` and ``k_norm`` (per-head RMSNorms,
        one epsilon) each head normed first, in the one op that does both."""
        if q_norm is not None and positions.dim() == 1:
            return self.ops.qk_norm_rotary_embedding(positions, q, k, q_norm.weight, k_norm.weight, q_norm.eps,
                                                     self.cos_sin_cache, self.is_neox)
        if q_norm is not None:
            q, k = q_norm(q), k_norm(k)
        if positions.dim() == 2:
            # Each token's cos/sin row mixes its three positions' rows; the op then reads row t for token t.
            rows = self.cos_sin_cache[positions]
            mixed = rows.gather(0, self.mrope_axis.expand(1, positions.shape[1], -1)).squeeze(0)
            positions = torch.arange(positions.shape[1], device=positions.device)
            return self.ops.rotary_embedding(positions, q, k, mixed, self.is_neox)
        return self.ops.rotary_embedding(positions, q, k, self.cos_sin_cache, self.is_neox)
