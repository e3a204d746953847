"""One image of a prompt, preprocessed: what crosses from the API process to the engine core.

The API process decodes and preprocesses images with the model's own HF image processor and
expands each image's placeholder into the tokens its encoder output fills; the core keeps the
pixels with the request until its encoder has run. ``hash`` names the image's content: the
encoder cache and the prefix cache key on it, so the same image is encoded once and a shared
prefix holding it is reused.
"""

from __future__ import annotations

import hashlib
from typing import Optional

import msgspec
import numpy as np
import torch


class ImageInput(msgspec.Struct, array_like=True, frozen=True):
    """A preprocessed image and where its placeholder tokens sit in the prompt."""

    hash: str
    """SHA-256 (hex) of the pixel values, their shape and grid: equal images, equal hashes."""
    offset: int
    """Prompt index of the first placeholder token."""
    length: int
    """Placeholder tokens, one per row of the encoder's output for this image."""
    data: bytes
    """Pixel values (C order) as the image processor made them."""
    shape: list[int]
    dtype: str
    grid_thw: Optional[list[int]] = None
    """Qwen2-VL: the patch grid (temporal, height, width) before the spatial merge."""
    image_size: Optional[list[int]] = None
    """LLaVA-NeXT: the image's (height, width) before preprocessing, which its tiling follows."""

    @classmethod
    def from_array(cls, pixels: np.ndarray, offset: int, length: int, grid_thw: Optional[list[int]] = None,
                   image_size: Optional[list[int]] = None) -> "ImageInput":
        """``pixels``: what the encoder takes for this image, concatenated with other images'
        along the first dimension (LLaVA: [1 or tiles, 3, H, W]; Qwen2-VL: [patches, C*T*P*P])."""
        pixels = np.ascontiguousarray(pixels)
        digest = hashlib.sha256(pixels.tobytes())
        digest.update(repr((pixels.dtype.str, pixels.shape, grid_thw, image_size)).encode())
        return cls(digest.hexdigest(), offset, length, pixels.tobytes(), list(pixels.shape), pixels.dtype.name,
                   grid_thw, image_size)

    @property
    def end(self) -> int:
        """Prompt index just past the last placeholder token."""
        return self.offset + self.length

    def pixel_values(self) -> torch.Tensor:
        return torch.from_numpy(np.frombuffer(self.data, dtype=self.dtype).reshape(self.shape).copy())
