"""The ops Gaudi runs with the HPU library's fused kernels, where that library provides them.

``kernels()`` registers an op only when its fused kernel imports; otherwise the reference (plain
torch, which the HPU runs op by op) serves it. Each wrapper keeps the reference's semantics:
float32 statistics, results in the input dtype, the residual sum rounded before the norm.
"""

from __future__ import annotations

from typing import Callable

import torch

from runtime.platform import Kernel

from . import hpu


def fused_rms_norm_op() -> Callable | None:
    """``FusedRMSNorm.apply(x, weight, eps)``: the TPC's one-pass RMSNorm."""
    return hpu.fused("hpex.normalization", "FusedRMSNorm")


def fused_sdpa_op() -> Callable | None:
    """``FusedSDPA.apply(q, k, v, attn_mask, dropout_p, is_causal, scale)``: flash attention on the MME."""
    return hpu.fused("hpex.kernels", "FusedSDPA")


def rms_norm_with(fused) -> Callable:
    def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return fused.apply(x, weight, eps)
    return rms_norm


def fused_add_rms_norm_with(fused) -> Callable:
    def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
        summed = x + residual  # in the input dtype: the reference rounds the sum before the norm too
        return fused.apply(summed, weight, eps), summed
    return fused_add_rms_norm


def sdpa_with(fused) -> Callable:
    """An SDPA with ``torch.nn.functional``'s call (bool mask, scale) made of ``FusedSDPA``."""
    def sdpa(query, key, value, attn_mask, scale):
        bias = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device).masked_fill(~attn_mask, float("-inf"))
        return fused.apply(query, key, value, bias, 0.0, False, scale)
    return sdpa


def kernels(platform: str) -> list[Kernel]:
    norm = fused_rms_norm_op()
    if norm is None:
        return []
    return [Kernel(platform, "rms_norm", rms_norm_with(norm)),
            Kernel(platform, "fused_add_rms_norm", fused_add_rms_norm_with(norm))]
