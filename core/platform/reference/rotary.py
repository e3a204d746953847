"""Rotary position embedding: the cos/sin cache the core builds, and the reference op applying it.

The cache is ``[max_positions, rotary_dim]``: cos of the ``rotary_dim/2`` frequencies, then sin.
Scaling (linear, dynamic NTK, Llama-3, YaRN) only changes the frequencies and an attention
factor folded into cos/sin, so every platform's kernel applies the same cache the same way.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .norm import rms_norm
from .precision import wide


def rope_inv_freq(rotary_dim: int, base: float, scaling: dict[str, Any] | None, max_positions: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (float64) and the cos/sin multiplier for a rope_scaling dict.

    ``scaling`` is the checkpoint's ``rope_scaling`` (HF names). ``dynamic`` is applied
    statically for ``max_positions`` (what a paged cache needs): unchanged when the model's
    ``original_max_position_embeddings`` covers it, NTK-scaled base beyond.
    """
    def plain(b: float) -> torch.Tensor:
        return 1.0 / (b ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))

    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind in (None, "default"):
        return plain(base), 1.0
    factor = float(scaling.get("factor", 1.0))
    if kind == "linear":
        return plain(base) / factor, 1.0
    if kind == "dynamic":
        original = int(scaling.get("original_max_position_embeddings") or max_positions)
        if max_positions <= original:
            return plain(base), 1.0
        scaled = base * ((factor * max_positions / original) - (factor - 1)) ** (rotary_dim / (rotary_dim - 2))
        return plain(scaled), 1.0
    if kind == "llama3":
        inv_freq = plain(base)
        low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
        original = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        smooth = (original / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        out = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
        medium = (wavelen <= original / low) & (wavelen >= original / high)
        return torch.where(medium, smoothed, out), 1.0
    if kind == "yarn":
        original = float(scaling.get("original_max_position_embeddings") or max_positions)
        beta_fast, beta_slow = float(scaling.get("beta_fast") or 32), float(scaling.get("beta_slow") or 1)

        def correction_dim(rotations: float) -> float:
            return rotary_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

        def yarn_mscale(m: float = 1.0) -> float:
            return 0.1 * m * math.log(factor) + 1.0 if factor > 1 else 1.0

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        # gpt-oss sets truncate=False: the ramp starts and ends between integer dimensions.
        if scaling.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, rotary_dim - 1)
        ramp = (torch.arange(rotary_dim // 2, dtype=torch.float64) - low) / max(high - low, 1e-3)
        extrapolation = 1 - ramp.clamp(0, 1)
        inv_freq = plain(base)
        inv_freq = inv_freq / factor * (1 - extrapolation) + inv_freq * extrapolation
        attention_factor = scaling.get("attention_factor")
        if attention_factor is None:
            # DeepSeek-style configs give mscale and mscale_all_dim; their ratio (often 1) scales cos/sin.
            m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
            attention_factor = yarn_mscale(m) / yarn_mscale(m_all) if m and m_all else yarn_mscale()
        return inv_freq, float(attention_factor)
    raise ValueError(f"unsupported rope_scaling type {kind!r}; supported: default, linear, dynamic, llama3, yarn")


def build_cos_sin_cache(rotary_dim: int, base: float, max_positions: int, scaling: dict[str, Any] | None = None,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
    inv_freq, mscale = rope_inv_freq(rotary_dim, base, scaling, max_positions)
    freqs = torch.outer(torch.arange(max_positions, dtype=torch.float64), inv_freq)
    return torch.cat([freqs.cos() * mscale, freqs.sin() * mscale], dim=-1).to(dtype)


def rotary_embedding(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, cos_sin_cache: torch.Tensor,
                     is_neox: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate the first ``rotary_dim`` features of query [T, H, D] and key [T, Hkv, D].

    ``is_neox``: halves rotated together (HF Llama layout); otherwise interleaved pairs (GPT-J).
    """
    rotary_dim = cos_sin_cache.shape[-1]
    cos, sin = wide(cos_sin_cache[positions]).chunk(2, dim=-1)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        rot, rest = wide(x[..., :rotary_dim]), x[..., rotary_dim:]
        if is_neox:
            x1, x2 = rot.chunk(2, dim=-1)
            out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
        else:
            x1, x2 = rot[..., 0::2], rot[..., 1::2]
            out = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
        return torch.cat([out.to(x.dtype), rest], dim=-1)

    return rotate(query), rotate(key)


def qk_norm_rotary_embedding(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, q_weight: torch.Tensor,
                             k_weight: torch.Tensor, eps: float, cos_sin_cache: torch.Tensor,
                             is_neox: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Every head of query [T, H, D] and key [T, Hkv, D] normed (``rms_norm`` with ``q_weight`` /
    ``k_weight`` [D], each result rounded to the input dtype), then ``rotary_embedding``: the
    attention input of Qwen3 (dense and MoE) in one op (contract 1.13), which a platform may run
    in one pass."""
    return rotary_embedding_from(rms_norm, rotary_embedding, positions, query, key, q_weight, k_weight, eps,
                                 cos_sin_cache, is_neox)


def rotary_embedding_from(norm, rotate, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                          q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float, cos_sin_cache: torch.Tensor,
                          is_neox: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``qk_norm_rotary_embedding`` made of a platform's own ``rms_norm`` and ``rotary_embedding``
    (``norm``, ``rotate``): what a platform that does not register the fused op runs."""
    return rotate(positions, norm(query, q_weight, eps), norm(key, k_weight, eps), cos_sin_cache, is_neox)
