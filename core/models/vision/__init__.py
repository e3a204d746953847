"""Vision-language models: an image encoder beside the decoder, by the checkpoint's architecture.

A LLaVA(-NeXT) or Qwen2-VL checkpoint is the decoder the runtime already runs (its ``text_config``)
plus a vision encoder whose output rows replace the embeddings of each image's placeholder
tokens. ``vision_arch`` says which, and what the rest of the engine needs to know about it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Optional

from ...loader.stored import materialize


@dataclass(frozen=True)
class VisionArch:
    name: str
    """``llava``, ``llava_next`` or ``qwen2_vl`` (Qwen2.5-VL too: its tower is told apart by its config)."""
    image_token_id: int
    """The placeholder token, repeated once per row of an image's encoder output."""
    placeholder: str
    """The text a prompt holds for one image, where a chat template does not write it."""
    mrope_section: Optional[tuple[int, ...]] = None
    """Qwen2-VL: rotary dimensions (halves) driven by the temporal, height and width positions."""
    vision_start_token_id: Optional[int] = None


VISION_ARCHITECTURES = ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration",
                        "Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")


def vision_arch(config: Any) -> Optional[VisionArch]:
    """What the checkpoint's vision side is, or None for a text-only model."""
    names = list(getattr(config, "architectures", None) or [])
    if "LlavaForConditionalGeneration" in names:
        return VisionArch("llava", config.image_token_index, "<image>")
    if "LlavaNextForConditionalGeneration" in names:
        return VisionArch("llava_next", config.image_token_index, "<image>")
    if "Qwen2VLForConditionalGeneration" in names or "Qwen2_5_VLForConditionalGeneration" in names:
        text = config.text_config
        rope = dict(getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {})
        section = tuple(rope["mrope_section"]) if "mrope_section" in rope else None
        return VisionArch("qwen2_vl", config.image_token_id, "<|vision_start|><|image_pad|><|vision_end|>",
                          mrope_section=section, vision_start_token_id=config.vision_start_token_id)
    return None


def text_config(config: Any) -> Any:
    """The decoder's config: a vision-language checkpoint's ``text_config``, else the config itself."""
    return config.text_config if vision_arch(config) is not None else config


# Checkpoint names of the decoder, old layout and transformers 5's, -> the decoder's HF names.
_TEXT_PREFIXES = (("language_model.model.", "model."), ("model.language_model.", "model."),
                  ("language_model.lm_head.", "lm_head."))
_VISION_PREFIXES = ("vision_tower.", "model.vision_tower.", "multi_modal_projector.", "model.multi_modal_projector.",
                    "image_newline", "model.image_newline", "visual.", "model.visual.")


def is_vision_weight(name: str) -> bool:
    return name.startswith(_VISION_PREFIXES)


def vision_weight_name(name: str) -> str:
    """A vision tensor's name inside the encoder module (``vision_tower.``/``visual.`` kept)."""
    name = name.removeprefix("model.")
    return name.replace("vision_tower.vision_model.", "vision_tower.", 1)


def text_weights(weights: Iterator[tuple[str, Any]], vision: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """The decoder's tensors of a checkpoint stream under the decoder's names; the vision
    tensors are read into ``vision`` on the way (they are small beside the decoder)."""
    for name, value in weights:
        if is_vision_weight(name):
            vision[vision_weight_name(name)] = materialize(value)
            continue
        for old, new in _TEXT_PREFIXES:
            if name.startswith(old):
                name = new + name[len(old):]
                break
        yield name, value
