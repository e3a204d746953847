"""Phi-3: a Llama-shaped decoder whose checkpoints store fused qkv_proj and gate_up_proj."""

from __future__ import annotations

from typing import Any

from .decoder import DecoderSettings
from .layers.rotary import rope_settings
from .llama import common_settings


def phi3(config: Any) -> DecoderSettings:
    _, scaling, _ = rope_settings(config)
    if scaling is not None and scaling.get("rope_type", scaling.get("type")) in ("longrope", "su"):
        raise ValueError("Phi-3 long-context rope scaling (longrope/su) is not supported yet; use a 4k-context Phi-3 checkpoint")
    return common_settings(config)
