"""Prompts with images -> token ids with each image's placeholder expanded, and ImageInputs.

Preprocessing is the model's own HF image processor (``preprocessor_config.json`` beside the
weights), so pixels match what the model was trained on: LLaVA's CLIP resize, crop and
normalisation, Qwen2-VL's native-resolution patches. A prompt holds one placeholder token per
image (``<image>``; Qwen2-VL's ``<|image_pad|>`` between ``<|vision_start|>`` and
``<|vision_end|>``), which becomes as many tokens as the encoder gives the image rows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ..models.vision import VisionArch, vision_arch
from ..models.vision.llava_next import anyres_tokens
from .inputs import ImageInput
from .media import MediaError

DEFAULT_IMAGE_LIMIT = 4
"""Images one prompt may hold unless ``--limit-mm-per-prompt`` says otherwise."""


def parse_image_limit(value: Any) -> int:
    """Images per prompt from ``--limit-mm-per-prompt``: vLLM's JSON (``{"image": 2}``), a dict
    or an int; None: the default."""
    if value is None:
        return DEFAULT_IMAGE_LIMIT
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(f"limit_mm_per_prompt {value!r} is not JSON; use e.g. '{{\"image\": 2}}'") from None
    if isinstance(value, dict):
        unknown = set(value) - {"image"}
        if unknown:
            raise ValueError(f"limit_mm_per_prompt names {', '.join(sorted(unknown))}: only image inputs are supported")
        value = value.get("image", DEFAULT_IMAGE_LIMIT)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"limit_mm_per_prompt's image count must be an integer >= 0, got {value!r}")
    return value


class ImageProcessor:
    """A vision-language checkpoint's preprocessing; ``process`` turns a prompt and its images
    into what the engine takes."""

    def __init__(self, config: Any, path: Path, tokenizer: Any, limit: int = DEFAULT_IMAGE_LIMIT):
        arch = vision_arch(config)
        if arch is None:
            raise ValueError("the model takes no images")
        from transformers import AutoImageProcessor

        try:
            self.hf = AutoImageProcessor.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as exc:
            reason = str(exc).strip().splitlines()[0]
            raise ValueError(f"could not load the image processor from {path} (expected preprocessor_config.json): "
                             f"{reason}") from None
        self.arch: VisionArch = arch
        self.config, self.tokenizer, self.limit = config, tokenizer, limit
        self.placeholder = arch.placeholder
        # Qwen2-VL's video placeholder: the runtime has no video preprocessing or time positions.
        self.video_token_id = getattr(config, "video_token_id", None)

    def process(self, token_ids: Sequence[int], images: Sequence[Any]) -> tuple[list[int], list[ImageInput]]:
        """(token ids with every placeholder expanded, one ImageInput per image in order).
        MediaError (a ValueError) when the count is over the limit or does not match the prompt's
        placeholders, or the prompt holds a video placeholder."""
        if len(images) > self.limit:
            raise MediaError(f"{len(images)} images in one prompt, at most {self.limit} are accepted "
                             f"(--limit-mm-per-prompt)")
        token_id = self.arch.image_token_id
        ids = np.asarray(token_ids, dtype=np.int64)
        if self.video_token_id is not None and (ids == self.video_token_id).any():
            raise MediaError("the prompt holds a video placeholder (video_token_id): video inputs are not supported, "
                             "only images")
        slots = np.flatnonzero(ids == token_id).tolist()
        if len(slots) != len(images):
            raise MediaError(f"the prompt has {len(slots)} image placeholders ({self.placeholder!r}) for "
                             f"{len(images)} images: put one placeholder where each image goes")
        if not images:
            return list(token_ids), []
        pixels, grids, lengths = self._preprocess(images)
        expanded: list[int] = []
        inputs: list[ImageInput] = []
        previous = 0
        sizes = [[image.height, image.width] for image in images]
        for slot, image_pixels, grid, length, size in zip(slots, pixels, grids, lengths, sizes):
            expanded += token_ids[previous:slot]
            inputs.append(ImageInput.from_array(image_pixels, len(expanded), length, grid,
                                                size if self.arch.name == "llava_next" else None))
            expanded += [token_id] * length
            previous = slot + 1
        expanded += token_ids[previous:]
        return expanded, inputs

    def _preprocess(self, images: Sequence[Any]) -> tuple[list[np.ndarray], list[Optional[list[int]]], list[int]]:
        """Per image: pixel values, patch grid (Qwen2-VL) and placeholder tokens."""
        try:
            out = self.hf(images=list(images), return_tensors="np")
        except (ValueError, TypeError, OSError) as exc:
            raise MediaError(f"the image processor rejected an image: {exc}") from None
        values = np.asarray(out["pixel_values"], dtype=np.float32)
        if self.arch.name == "qwen2_vl":
            grids = [list(map(int, g)) for g in out["image_grid_thw"]]
            sizes = [t * h * w for t, h, w in grids]
            merge = self.config.vision_config.spatial_merge_size
            pixels = np.split(values, np.cumsum(sizes)[:-1])
            return pixels, grids, [size // (merge * merge) for size in sizes]
        if self.arch.name == "llava_next":
            # Padded to the most tiles of the batch: each image keeps its own.
            sizes = [list(map(int, size)) for size in out["image_sizes"]]
            counts = [anyres_tokens(self.config, size) for size in sizes]
            return [values[i, :tiles] for i, (tiles, _) in enumerate(counts)], [None] * len(sizes), \
                [length for _, length in counts]
        vision = self.config.vision_config
        # CLIP adds a class row, the "default" strategy drops the first row.
        extra = (vision.model_type == "clip_vision_model") - (self.config.vision_feature_select_strategy == "default")
        length = (values.shape[-2] // vision.patch_size) * (values.shape[-1] // vision.patch_size) + extra
        return list(values[:, None]), [None] * len(values), [length] * len(values)
