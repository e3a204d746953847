"""The TPU attention backend: paged attention as one static XLA graph per bucket.

``runtime.platform.padded_attention`` writes the new K/V with a masked scatter (padding tokens
rewrite the null block's slot with its own value) and gathers each token's sequence from the
block table, masking by length and position: every shape follows from the padded step's shape,
and nothing is read back to the host inside the step. Products are float32 einsums (XLA fuses
the mask, the soft-cap and the softmax into them).
"""

from __future__ import annotations

import torch

from runtime.platform import AttentionBackend, AttentionMetadata
from runtime.platform.padded_attention import padded_paged_attention, write_kv


class XlaPagedAttentionBackend(AttentionBackend):
    name = "xla_paged"
    platform = "tpu"
    priority = 10
    supported_dtypes = (torch.bfloat16, torch.float32)
    supports_sliding_window = True
    supports_logits_soft_cap = True

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        write_kv(key, value, kv_cache, meta.slot_mapping)
        spec = self.spec
        return padded_paged_attention(query, kv_cache, meta, self.name, spec.scale, sliding_window=spec.sliding_window,
                                      logits_soft_cap=spec.logits_soft_cap)
