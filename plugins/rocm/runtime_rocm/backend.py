"""The ROCm attention backend: runtime-triton's unified paged attention with the AMD tile plans."""

from __future__ import annotations

from runtime.platform import AttentionSpec
from runtime_triton.attention import TritonAttentionBackend
from runtime_triton.tile_plans.amd import PLANS

from .arch import ocp_fp8


class RocmTritonAttentionBackend(TritonAttentionBackend):
    platform = "rocm"
    tile_plans = PLANS

    @classmethod
    def unsupported_reason(cls, spec: AttentionSpec) -> str | None:
        reason = super().unsupported_reason(spec)
        if reason is None and spec.kv_cache_dtype != "auto":
            # The cache's fp8 formats are the OCP ones (runtime.platform.KV_CACHE_DTYPES).
            from .plugin import platform_class

            arch = platform_class()().arch()
            if not ocp_fp8(arch):
                return (f"an fp8 KV cache stores OCP fp8, which {arch} does not convert (MI300 computes in the FNUZ "
                        "formats); use --kv-cache-dtype auto")
        return reason
