"""The Metal platform: an Apple silicon GPU through torch's MPS device.

The GPU shares the machine's memory with the CPU (``unified_memory``): there is no separate
device memory to offload the KV cache from, so KV offload and preemption by swap are off, and
the cache's budget is a share of what the system can still give the GPU (Metal's recommended
working set), not of a card. There is one GPU and no collective library: tensor and pipeline
parallelism are refused with the reason.
"""

from __future__ import annotations

import platform as host

import torch

from runtime.platform import Platform, PlatformConfig
from runtime.platform.emulation import EmulatedPlatform


class MetalPlatform(Platform):
    name = "metal"
    device_type = "mps"
    priority = 50
    # MPS has no float64 and, before macOS 14, no bfloat16: float16 is the dtype every Apple GPU computes.
    supported_dtypes = (torch.float16, torch.bfloat16, torch.float32)
    unified_memory = True
    host_copy_bytes_per_s = 1.0e11  # the same memory: a copy costs a memcpy's bandwidth
    flops_per_s = 1.0e13

    # Without --kv-cache-memory the KV cache takes this share of what Metal would still give the
    # process after the weights: the rest stays for the desktop and other apps on the same memory.
    DEFAULT_KV_FRACTION = 0.5

    @classmethod
    def is_available(cls) -> bool:
        return cls.unavailable_reason() is None

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if host.system() != "Darwin":
            return f"Metal needs macOS on Apple silicon; this is {host.system()} {host.machine()}"
        try:
            if not torch.backends.mps.is_built():
                return "this torch build has no MPS support; install torch's macOS arm64 wheel"
            if not torch.backends.mps.is_available():
                return "MPS is not available (macOS 12.3+ on Apple silicon with a Metal GPU is needed)"
        except Exception as exc:  # never raise from availability
            return f"MPS failed: {type(exc).__name__}: {exc}"
        return None

    def device(self, index: int = 0) -> torch.device:
        return torch.device("mps")

    def device_count(self) -> int:
        return 1

    def device_name(self, index: int = 0) -> str:
        return f"Apple {host.machine()} GPU (Metal)"

    def memory_info(self, index: int = 0) -> tuple[int, int]:
        """(free, total): what Metal recommends the process keep resident, less what it holds."""
        total = int(torch.mps.recommended_max_memory())
        return max(0, total - int(torch.mps.driver_allocated_memory())), total

    def default_dtype(self) -> torch.dtype:
        return torch.float16

    def default_max_num_seqs(self) -> int:
        return 32

    def check_and_update_config(self, config: PlatformConfig) -> None:
        super().check_and_update_config(config)
        if config.kv_cache_dtype != "auto":
            raise ValueError(f"--kv-cache-dtype {config.kv_cache_dtype} is not supported on metal (MPS has no fp8); use auto")

    def kv_cache_memory(self, requested_bytes: int | None, gpu_memory_utilization: float, non_kv_bytes: int) -> int:
        if requested_bytes is not None:
            return requested_bytes
        free, _ = self.memory_info()
        return int(max(free - non_kv_bytes, 0) * self.DEFAULT_KV_FRACTION)

    def synchronize(self) -> None:
        torch.mps.synchronize()


class EmulatedMetalPlatform(EmulatedPlatform, MetalPlatform):
    """``RUNTIME_EMULATE=metal``: the platform's SDPA attention and dtype rules on the host CPU."""
