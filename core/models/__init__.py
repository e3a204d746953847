"""Supported architectures, by the name in a checkpoint's ``config.architectures``."""

from __future__ import annotations

from typing import Any, Callable

from .decoder import DecoderForCausalLM, DecoderSettings
from .gemma import gemma, gemma2
from .llama import llama, qwen2, qwen3
from .moe import mixtral, qwen2_moe, qwen3_moe
from .phi3 import phi3
from .vision import VISION_ARCHITECTURES, vision_arch

ARCHITECTURES: dict[str, Callable[[Any], DecoderSettings]] = {
    "LlamaForCausalLM": llama,
    "MistralForCausalLM": llama,
    "Qwen2ForCausalLM": qwen2,
    "Qwen3ForCausalLM": qwen3,
    "GemmaForCausalLM": gemma,
    "Gemma2ForCausalLM": gemma2,
    "Phi3ForCausalLM": phi3,
    "MixtralForCausalLM": mixtral,
    "Qwen2MoeForCausalLM": qwen2_moe,
    "Qwen3MoeForCausalLM": qwen3_moe,
    # Base models without an output layer, as embedding checkpoints ship them (e5-mistral's
    # MistralModel); they serve with --task embed.
    "LlamaModel": llama,
    "MistralModel": llama,
    "Qwen2Model": qwen2,
    "Qwen3Model": qwen3,
}
# Configs built from GGUF metadata may carry only a model_type.
MODEL_TYPES = {"llama": llama, "mistral": llama, "qwen2": qwen2, "qwen3": qwen3, "gemma": gemma, "gemma2": gemma2, "phi3": phi3,
               "mixtral": mixtral, "qwen2_moe": qwen2_moe, "qwen3_moe": qwen3_moe,
               # Vision-language checkpoints' text_config (models/vision): their decoders.
               "qwen2_vl_text": qwen2, "qwen2_vl": qwen2, "qwen2_5_vl_text": qwen2, "qwen2_5_vl": qwen2}


def decoder_settings(config: Any) -> DecoderSettings:
    """The settings for a HF config, or a ValueError naming the supported architectures. A
    vision-language checkpoint's are its decoder's (``text_config``)."""
    arch = vision_arch(config)
    if arch is not None:
        text = config.text_config
        settings = MODEL_TYPES[text.model_type](text) if text.model_type in MODEL_TYPES else decoder_settings(text)
        settings.mrope_section = arch.mrope_section
        return settings
    names = list(getattr(config, "architectures", None) or [])
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name](config)
    if not names and getattr(config, "model_type", None) in MODEL_TYPES:
        return MODEL_TYPES[config.model_type](config)
    raise ValueError(f"unsupported architecture {', '.join(names) or getattr(config, 'model_type', '?')}; "
                     f"supported: {', '.join(ARCHITECTURES)}, {', '.join(VISION_ARCHITECTURES)}")


__all__ = ["ARCHITECTURES", "DecoderForCausalLM", "DecoderSettings", "decoder_settings"]
