"""Emulation mode: a platform plugin's hardware-independent logic and plain-torch ops on the host CPU.

``RUNTIME_EMULATE=rocm,tpu`` (a comma-separated list of platform names) asks the plugins named
to register an emulated variant of their platform instead of the real one: the same name,
detection answered as if the hardware were there (facts like an AMD GPU's architecture come
from the plugin's own variables), tensors on the CPU, and the plugin's own attention backend and
kernels where they are plain torch (or Triton under ``TRITON_INTERPRET=1``). The conformance
suite then checks those ops on a machine without the hardware. What emulation cannot show:
the vendor kernels, graphs, collectives and memory of the real device (docs/platforms.md).
"""

from __future__ import annotations

import os

import torch

from .interface import Platform

EMULATE_ENV = "RUNTIME_EMULATE"


def emulated(name: str) -> bool:
    """Whether ``RUNTIME_EMULATE`` names the platform ``name``."""
    return name in {part.strip() for part in os.environ.get(EMULATE_ENV, "").split(",")}


def host_memory() -> tuple[int, int]:
    """(available, total) bytes of host memory, from /proc/meminfo or sysconf."""
    try:
        fields = {}
        with open("/proc/meminfo") as f:
            for line in f:
                key, value = line.split(":", 1)
                fields[key] = int(value.split()[0]) * 1024
        return fields.get("MemAvailable", fields["MemFree"]), fields["MemTotal"]
    except (OSError, KeyError, ValueError):
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return total // 2, total


class EmulatedPlatform(Platform):
    """Put first among a real platform's bases: the host CPU stands in for the device.

    Everything else (name, dtypes, config adjustment, bucketing) is the real platform's own.
    """

    device_type = "cpu"
    dist_backend = "gloo"  # the host's collectives: NCCL, HCCL and XLA need their devices
    unified_memory = True
    supports_graphs = False
    # An emulated cache is for checks and tiny models: a small share of the host.
    KV_CACHE_CAP = 1 << 30

    @classmethod
    def is_available(cls) -> bool:
        return True

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return None

    def device(self, index: int = 0) -> torch.device:
        return torch.device("cpu")

    def device_count(self) -> int:
        return 1

    def device_name(self, index: int = 0) -> str:
        return f"{self.name} emulated on the host CPU ({EMULATE_ENV})"

    def memory_info(self, index: int = 0) -> tuple[int, int]:
        return host_memory()

    def kv_cache_memory(self, requested_bytes: int | None, gpu_memory_utilization: float, non_kv_bytes: int) -> int:
        if requested_bytes is not None:
            return requested_bytes
        free, _ = self.memory_info()
        return int(min(max(free - non_kv_bytes, 0) // 4, self.KV_CACHE_CAP))

    def synchronize(self) -> None:
        pass

    def mark_step(self) -> None:
        pass  # eager torch on the host: nothing traced to launch

    def peak_memory_allocated(self) -> int | None:
        return None

    def reset_peak_memory(self) -> None:
        pass
