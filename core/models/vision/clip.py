"""LLaVA's image side: a CLIP or SigLIP vision transformer and the projector into the decoder's width.

Plain torch (layer norms, SDPA): the encoder runs once per image, bidirectionally over a fixed
number of patches, with none of the decoder's paged attention. Parameter names are HF's.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...multimodal.inputs import ImageInput
from .activations import activation


class ClipAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(width, width) for _ in range(3))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        q, k, v = (proj(x).view(batch, tokens, self.heads, -1).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(batch, tokens, width))


class ClipMLP(nn.Module):
    def __init__(self, width: int, hidden: int, act: str):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ClipLayer(nn.Module):
    def __init__(self, config: Any):
        super().__init__()
        width, eps = config.hidden_size, config.layer_norm_eps
        self.layer_norm1 = nn.LayerNorm(width, eps=eps)
        self.self_attn = ClipAttention(width, config.num_attention_heads)
        self.layer_norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = ClipMLP(width, config.intermediate_size, config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class PatchEmbeddings(nn.Module):
    """CLIP's (a class row first, no bias) or SigLIP's (patches only, a biased projection)."""

    def __init__(self, config: Any, class_row: bool):
        super().__init__()
        width, patch = config.hidden_size, config.patch_size
        if class_row:
            self.class_embedding = nn.Parameter(torch.empty(width))
        self.class_row = class_row
        self.patch_embedding = nn.Conv2d(config.num_channels, width, patch, stride=patch, bias=not class_row)
        self.position_embedding = nn.Embedding((config.image_size // patch) ** 2 + class_row, width)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        if self.class_row:
            patches = torch.cat([self.class_embedding.expand(patches.shape[0], 1, -1), patches], dim=1)
        return patches + self.position_embedding.weight


class VisionTower(nn.Module):
    """CLIP's or SigLIP's vision transformer (their layers are alike). Runs only the layers up to
    the ones whose outputs LLaVA reads (``vision_feature_layer``)."""

    def __init__(self, config: Any, feature_layers: list[int]):
        super().__init__()
        total = config.num_hidden_layers
        # hidden_states[0] is the embeddings; hidden_states[i] the output of layer i.
        self.feature_layers = [i if i >= 0 else total + 1 + i for i in feature_layers]
        self.class_row = config.model_type == "clip_vision_model"
        self.embeddings = PatchEmbeddings(config, self.class_row)
        # CLIP normalises the embeddings first (HF's name has its typo); SigLIP does not.
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if self.class_row else None
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(ClipLayer(config) for _ in range(max(self.feature_layers)))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        hidden = self.embeddings(pixels)
        if self.pre_layrnorm is not None:
            hidden = self.pre_layrnorm(hidden)
        states = [hidden]
        for layer in self.encoder.layers:
            hidden = layer(hidden)
            states.append(hidden)
        return torch.cat([states[i] for i in self.feature_layers], dim=-1)


class LlavaProjector(nn.Module):
    def __init__(self, vision_width: int, text_width: int, act: str, bias: bool):
        super().__init__()
        self.linear_1 = nn.Linear(vision_width, text_width, bias=bias)
        self.act = activation(act)
        self.linear_2 = nn.Linear(text_width, text_width, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class LlavaEncoder(nn.Module):
    """pixel values [N, 3, H, W] of N images (crops of one size) -> one [patches, text width]
    tensor per image."""

    def __init__(self, config: Any):
        super().__init__()
        vision = config.vision_config
        if vision.model_type not in ("clip_vision_model", "siglip_vision_model"):
            raise ValueError(f"LLaVA's vision_config.model_type {vision.model_type!r} is not supported: only CLIP "
                             f"(clip_vision_model) and SigLIP (siglip_vision_model) towers are")
        layers = config.vision_feature_layer
        layers = list(layers) if isinstance(layers, (list, tuple)) else [layers]
        # "default" drops the first row (CLIP's class row), "full" keeps every row.
        self.keep_first = config.vision_feature_select_strategy == "full"
        self.vision_tower = VisionTower(vision, layers)
        self.multi_modal_projector = LlavaProjector(vision.hidden_size * len(layers), config.text_config.hidden_size,
                                                    config.projector_hidden_act,
                                                    getattr(config, "multimodal_projector_bias", True))

    def project(self, pixels: torch.Tensor) -> torch.Tensor:
        """[crops, 3, H, W] -> [crops, patches (+ CLS), text width]."""
        features = self.vision_tower(pixels)
        if not self.keep_first:
            features = features[:, 1:]
        return self.multi_modal_projector(features)

    def forward(self, pixels: torch.Tensor, images: list[ImageInput]) -> list[torch.Tensor]:
        return list(self.project(pixels).unbind(0))
