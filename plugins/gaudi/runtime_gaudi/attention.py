"""The Gaudi attention backend: paged attention with shapes fixed by the step's bucket.

``runtime.platform.padded_attention`` gathers each token's sequence from the block table and
masks by length and position on the device, so a padded step is one static graph. The product
is the HPU library's ``FusedSDPA`` where it imports (no soft-capping then), else float32 einsums.
"""

from __future__ import annotations

import torch

from runtime.platform import AttentionBackend, AttentionMetadata, AttentionSpec
from runtime.platform.padded_attention import padded_paged_attention, write_kv

from .ops import fused_sdpa_op, sdpa_with


class GaudiPagedAttentionBackend(AttentionBackend):
    name = "gaudi_paged"
    platform = "gaudi"
    priority = 10
    supported_dtypes = (torch.bfloat16, torch.float32)
    supported_kv_cache_dtypes = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")
    supports_sliding_window = True
    supports_logits_soft_cap = True

    def __init__(self, spec: AttentionSpec):
        super().__init__(spec)
        fused = fused_sdpa_op()
        # Soft-capping goes between the product and the softmax, which FusedSDPA does not expose.
        self.sdpa = sdpa_with(fused) if fused is not None and spec.logits_soft_cap is None else None

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        write_kv(key, value, kv_cache, meta.slot_mapping)
        spec = self.spec
        return padded_paged_attention(query, kv_cache, meta, self.name, spec.scale, sliding_window=spec.sliding_window,
                                      logits_soft_cap=spec.logits_soft_cap, sdpa=self.sdpa)
