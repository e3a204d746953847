"""The runner's side of the encoder cache: image encoder outputs on the device, by image hash.

The scheduler's ``EncoderCacheManager`` decides what is computed and dropped; each step this
runs the encoder over the step's new images (one batch) and hands the decoder the rows of
every placeholder token the step computes.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..multimodal.inputs import ImageInput
from ..sched.scheduler import ScheduledRequest, SchedulerOutput
from .input_buffers import host_to_device


class EncoderOutputs:
    def __init__(self, encoder: nn.Module, device: torch.device, dtype: torch.dtype):
        self.encoder, self.device, self.dtype = encoder, device, dtype
        self.outputs: dict[str, torch.Tensor] = {}
        self.images_encoded = 0
        """Images run through the encoder since start (a cached image is not run again)."""

    def update(self, out: SchedulerOutput) -> None:
        """Drop what the scheduler evicted, then encode the step's new images."""
        for image_hash in out.encoder_freed:
            self.outputs.pop(image_hash, None)
        new = [image for image in {i.hash: i for i in out.encoder_inputs}.values() if image.hash not in self.outputs]
        if not new:
            return
        # Images whose pixels have the same trailing shape (LLaVA's fixed crops, Qwen2-VL's patches)
        # run as one batch, concatenated along the first dimension; the encoder splits it per image.
        groups: dict[tuple, list[ImageInput]] = {}
        for image in new:
            groups.setdefault(tuple(image.shape[1:]), []).append(image)
        for group in groups.values():
            batch = torch.cat([image.pixel_values() for image in group])
            rows = self.encoder(batch.to(self.device, non_blocking=True), group)
            for image, value in zip(group, rows):
                if value.shape[0] != image.length:
                    raise ValueError(f"the encoder made {value.shape[0]} rows for an image with {image.length} "
                                     f"placeholder tokens: the image processor and the model disagree")
                self.outputs[image.hash] = value.to(self.dtype)
        self.images_encoded += len(new)

    def gather(self, scheduled: list[ScheduledRequest], query_start: np.ndarray
               ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(flat token indices, encoder rows) of the step's placeholder tokens, or None if it has none."""
        indices, rows = [], []
        for i, item in enumerate(scheduled):
            begin, end = item.start, item.start + item.num_new_tokens
            for image in item.request.mm_inputs:
                lo, hi = max(begin, image.offset), min(end, image.end)
                if lo >= hi:
                    continue
                first = int(query_start[i]) + lo - begin
                indices.append(np.arange(first, first + hi - lo))
                rows.append(self.outputs[image.hash][lo - image.offset:hi - image.offset])
        if not rows:
            return None
        return host_to_device(np.concatenate(indices).tolist(), torch.int64, self.device), torch.cat(rows)
