"""The CPU platform: always available, lowest automatic priority, memory from the host."""

from __future__ import annotations

import os
import platform as host

import torch

from runtime.platform import Platform, PlatformConfig
from runtime.platform.emulation import host_memory


class CpuPlatform(Platform):
    name = "cpu"
    device_type = "cpu"
    priority = 0
    dist_backend = "gloo"
    supported_dtypes = (torch.float32, torch.bfloat16, torch.float16)
    unified_memory = True
    supports_deterministic = True
    # --preemption-mode auto, where a test lifts unified_memory: a memcpy against a few cores' matmuls.
    host_copy_bytes_per_s = 1.0e10
    flops_per_s = 1.0e11

    # Without --kv-cache-memory the KV cache takes this share of available memory after the
    # weights, capped so a laptop keeps room for everything else.
    DEFAULT_KV_FRACTION = 0.25
    DEFAULT_KV_CAP = 4 << 30

    @classmethod
    def is_available(cls) -> bool:
        return True

    def device_count(self) -> int:
        return 1

    def device_name(self, index: int = 0) -> str:
        return f"{host.processor() or host.machine()} ({os.cpu_count()} cores)"

    def memory_info(self, index: int = 0) -> tuple[int, int]:
        return host_memory()

    def default_dtype(self) -> torch.dtype:
        # float32, as llama.cpp computes on the CPU: bfloat16 is faster where the CPU has native bf16
        # dot products (--dtype bfloat16), but it flips near-tied greedy choices of small quantized
        # models (the embedded SmolLM2 stops answering "Paris").
        return torch.float32

    def default_max_num_seqs(self) -> int:
        # A few cores are saturated long before that many sequences; more only lengthens each step.
        return 64

    def check_and_update_config(self, config: PlatformConfig) -> None:
        super().check_and_update_config(config)
        if config.kv_cache_dtype != "auto":
            raise ValueError(f"--kv-cache-dtype {config.kv_cache_dtype} is not supported on cpu; use auto")

    def default_quantization(self, checkpoint_format: str, quantized_types: frozenset[str]) -> str | None:
        # A quantized checkpoint keeps its own format (GGUF's 4-bit types and 4-bit GPTQ/AWQ on the
        # int4 kernel, GGUF's others as int8: quant.py); dense checkpoints stay as given.
        return None

    def kv_cache_memory(self, requested_bytes: int | None, gpu_memory_utilization: float, non_kv_bytes: int) -> int:
        if requested_bytes is not None:
            return requested_bytes
        free, _ = self.memory_info()
        return int(min(max(free - non_kv_bytes, 0) * self.DEFAULT_KV_FRACTION, self.DEFAULT_KV_CAP))
