"""LLaVA-NeXT's image side: LLaVA's CLIP or SigLIP tower and projector over any-resolution tiles.

The image processor resizes an image to the best of ``image_grid_pinpoints`` and cuts it into
rows x cols tiles of the tower's size, plus the whole image at that size (the base). The base's
rows come first; then the tiles' rows laid out as one large feature map, the padding the resize
added cut off again (``unpad``), with the learned ``image_newline`` after each row of it.
``anyres_tokens`` counts those rows from the image's size alone, for the placeholder.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...multimodal.inputs import ImageInput
from .clip import LlavaEncoder


def anyres_grid(image_size: list[int], pinpoints: list[list[int]], tile: int) -> tuple[int, int]:
    """(rows, cols) of tiles the processor cuts an image of (height, width) ``image_size`` into."""
    from transformers.image_processing_utils import select_best_resolution

    height, width = select_best_resolution(list(image_size), pinpoints)
    return height // tile, width // tile


def unpadded_size(image_size: list[int], height: int, width: int) -> tuple[int, int]:
    """The part of a (height, width) feature map of the resized image that is not padding."""
    original_height, original_width = image_size
    if original_width / original_height > width / height:
        new_height = int(round(original_height * (width / original_width), 7))
        padding = (height - new_height) // 2
        return height - 2 * padding, width
    new_width = int(round(original_width * (height / original_height), 7))
    padding = (width - new_width) // 2
    return height, width - 2 * padding


def anyres_tokens(config: Any, image_size: list[int]) -> tuple[int, int]:
    """(tiles including the base, placeholder tokens) of an image of (height, width) ``image_size``."""
    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    rows, cols = anyres_grid(image_size, config.image_grid_pinpoints, vision.image_size)
    height, width = unpadded_size(image_size, rows * side, cols * side)
    return rows * cols + 1, side * side + height * (width + 1)


class LlavaNextEncoder(LlavaEncoder):
    """Tiles of several images [sum of tiles, 3, H, W] -> one [tokens, text width] tensor per image."""

    def __init__(self, config: Any):
        super().__init__(config)
        # Each tile's rows are laid out as a side x side map: CLIP's class row must go, SigLIP has none.
        if self.keep_first == self.vision_tower.class_row:
            tower, needed = ("CLIP", "default") if self.vision_tower.class_row else ("SigLIP", "full")
            raise ValueError(f"LLaVA-NeXT with a {tower} tower needs vision_feature_select_strategy '{needed}', "
                             f"the config says {config.vision_feature_select_strategy!r}: set it to '{needed}'")
        self.config = config
        self.image_newline = nn.Parameter(torch.empty(config.text_config.hidden_size))

    def forward(self, pixels: torch.Tensor, images: list[ImageInput]) -> list[torch.Tensor]:
        features = self.project(pixels).split([image.shape[0] for image in images])
        return [self._pack(tiles, image.image_size) for tiles, image in zip(features, images)]

    def _pack(self, tiles: torch.Tensor, image_size: list[int]) -> torch.Tensor:
        vision = self.config.vision_config
        side = vision.image_size // vision.patch_size
        base, grid = tiles[0], tiles[1:]
        rows, cols = anyres_grid(image_size, self.config.image_grid_pinpoints, vision.image_size)
        width = grid.shape[-1]
        # [rows*cols, side*side, D] -> one [D, rows*side, cols*side] map.
        grid = grid.view(rows, cols, side, side, width).permute(4, 0, 2, 1, 3).reshape(width, rows * side, cols * side)
        height, kept = unpadded_size(image_size, rows * side, cols * side)
        top, left = (rows * side - height) // 2, (cols * side - kept) // 2
        grid = grid[:, top:top + height, left:left + kept]
        newline = self.image_newline.to(grid.dtype)[:, None, None].expand(width, height, 1)
        grid = torch.cat([grid, newline], dim=-1).flatten(1).transpose(0, 1)
        return torch.cat([base, grid])
