"""What a model's forward pass receives: one flattened varlen batch, passed explicitly."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..platform import AttentionMetadata


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor
    """[T] token ids of every scheduled request's new tokens, concatenated."""
    positions: torch.Tensor
    """[T] position of each token in its sequence."""
    attn: AttentionMetadata
    kv_caches: list[torch.Tensor]
    """One cache tensor per attention layer, in the backend's layout."""
    mm_embeds: Optional[tuple[torch.Tensor, torch.Tensor]] = None
    """Images: (token indices [N], encoder rows [N, hidden]) that replace those tokens' embeddings."""
    rope_positions: Optional[torch.Tensor] = None
    """M-RoPE (Qwen2-VL): [3, T] rotary positions; None: rotary uses ``positions``."""

    @property
    def rotary_positions(self) -> torch.Tensor:
        return self.positions if self.rope_positions is None else self.rope_positions
