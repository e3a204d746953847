"""What a model's forward pass receives: one flattened varlen batch, passed explicitly."""

from __future__ import annotations

from dataclasses import dataclass

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
