"""The Metal attention backend: paged attention through ``scaled_dot_product_attention`` on MPS.

MPS has no paged-attention kernel and Triton does not target it; torch's SDPA is the fused
attention Apple's backend provides. ``runtime.platform.padded_attention`` gathers each token's
sequence from the block table into a dense key/value batch and hands SDPA a boolean mask
(causal, length, sliding window), all on the device with no host syncs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from runtime.platform import AttentionBackend, AttentionMetadata
from runtime.platform.padded_attention import padded_paged_attention, write_kv


class MetalSdpaAttentionBackend(AttentionBackend):
    name = "metal_sdpa"
    platform = "metal"
    priority = 10
    supported_dtypes = (torch.float16, torch.bfloat16, torch.float32)
    supports_sliding_window = True
    # SDPA has no hook between the product and the softmax.
    supports_logits_soft_cap = False

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        write_kv(key, value, kv_cache, meta.slot_mapping)
        return padded_paged_attention(query, kv_cache, meta, self.name, self.spec.scale,
                                      sliding_window=self.spec.sliding_window, sdpa=F.scaled_dot_product_attention)
