"""The CUDA attention backend: runtime-triton's unified paged attention with the NVIDIA tile plans."""

from __future__ import annotations

import torch

from runtime.platform import AttentionSpec
from runtime_triton.attention import TritonAttentionBackend
from runtime_triton.tile_plans.nvidia import PLANS


class CudaTritonAttentionBackend(TritonAttentionBackend):
    platform = "cuda"
    tile_plans = PLANS

    @classmethod
    def unsupported_reason(cls, spec: AttentionSpec) -> str | None:
        reason = super().unsupported_reason(spec)
        # Triton has e4m3 conversions only where the hardware does (its fp8e4nv type); e5m2 it emulates.
        if reason is None and spec.cache_dtype == torch.float8_e4m3fn and torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            if (major, minor) < (8, 9):
                return (f"an fp8 (e4m3) KV cache needs compute capability 8.9 or newer, this GPU has {major}.{minor}; "
                        "use --kv-cache-dtype fp8_e5m2")
        return reason
