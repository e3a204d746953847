"""Build a checkpoint's image encoder and fill it from the vision tensors of its weight stream."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from . import vision_arch
from .clip import LlavaEncoder
from .llava_next import LlavaNextEncoder
from .qwen2_vit import Qwen2VLEncoder

_ENCODERS = {"llava": LlavaEncoder, "llava_next": LlavaNextEncoder, "qwen2_vl": Qwen2VLEncoder}


def build_encoder(config: Any) -> Optional[nn.Module]:
    """The encoder module (``forward(pixels, images) -> [tokens, text width] per image``), or
    None for a text-only model; built on the current default device and dtype."""
    arch = vision_arch(config)
    return None if arch is None else _ENCODERS[arch.name](config)


def load_encoder(encoder: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy the checkpoint's vision tensors in (by HF name); raises naming any missing or extra
    beyond the layers the encoder skips (those after the feature layer LLaVA reads)."""
    params = dict(encoder.named_parameters())
    missing = sorted(set(params) - set(tensors))
    if missing:
        raise ValueError(f"checkpoint is missing vision weights: {', '.join(missing[:5])}"
                         + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    for name, param in params.items():
        value = tensors[name]
        if tuple(value.shape) != tuple(param.shape):
            raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(value.shape)}, the encoder expects "
                             f"{tuple(param.shape)}")
        param.data.copy_(value.to(param.dtype))
    encoder.requires_grad_(False)
