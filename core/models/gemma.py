"""Gemma and Gemma-2: scaled embeddings, (1 + w) norms, GeLU-tanh; Gemma-2 adds sandwich norms,
soft-capping and alternating sliding windows."""

from __future__ import annotations

from typing import Any

from .decoder import DecoderSettings
from .llama import common_settings


def _activation(config: Any) -> str:
    return getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None) or "gelu_pytorch_tanh"


def gemma(config: Any) -> DecoderSettings:
    return common_settings(config, activation=_activation(config), embedding_scale=config.hidden_size ** 0.5,
                           norm_unit_offset=True)


def gemma2(config: Any) -> DecoderSettings:
    return common_settings(config, activation=_activation(config), embedding_scale=config.hidden_size ** 0.5,
                           norm_unit_offset=True, sandwich_norms=True,
                           attn_scale=config.query_pre_attn_scalar ** -0.5,
                           attn_soft_cap=getattr(config, "attn_logit_softcapping", None),
                           final_logit_soft_cap=getattr(config, "final_logit_softcapping", None))
