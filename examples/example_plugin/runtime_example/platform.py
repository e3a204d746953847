"""The example platform: the host CPU, presented as a device of its own."""

from __future__ import annotations

import os

import torch

from runtime.platform import Platform


class ExamplePlatform(Platform):
    name = "example"
    device_type = "cpu"
    # Below every real platform (cpu is 0): an example must never win automatic selection.
    priority = -10
    dist_backend = "gloo"
    supported_dtypes = (torch.float32, torch.bfloat16)

    @classmethod
    def is_available(cls) -> bool:
        return True

    def device_count(self) -> int:
        return 1

    def device_name(self, index: int = 0) -> str:
        return f"host CPU ({os.cpu_count()} cores)"

    def memory_info(self, index: int = 0) -> tuple[int, int]:
        page = os.sysconf("SC_PAGE_SIZE")
        return os.sysconf("SC_AVPHYS_PAGES") * page, os.sysconf("SC_PHYS_PAGES") * page

    def kv_cache_memory(self, requested_bytes: int | None, gpu_memory_utilization: float, non_kv_bytes: int) -> int:
        # Host memory is shared with everything else on the machine: take a quarter of what is free
        # rather than the default's share of the total, which suits a dedicated accelerator.
        if requested_bytes is not None:
            return requested_bytes
        free, _ = self.memory_info()
        return max(free - non_kv_bytes, 0) // 4
