"""The CUDA platform: NVIDIA GPUs through torch's CUDA build, kernels written in Triton."""

from __future__ import annotations

import importlib.util
from typing import Any, Callable

import torch

from runtime.platform import Platform, PlatformConfig
from runtime.worker.decode_graphs import MAX_CAPTURE_SIZE


def triton_importable() -> bool:
    """Whether triton is installed, without importing it (an import costs time and may fail loudly)."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


class CudaPlatform(Platform):
    name = "cuda"
    device_type = "cuda"
    priority = 100
    dist_backend = "nccl"
    supported_dtypes = (torch.bfloat16, torch.float16, torch.float32)

    supports_graphs = True
    supports_deterministic = True
    # --preemption-mode auto: an H100's pinned-memory copies over PCIe 5.0 reach about 25 GB/s
    # each way in practice, its bf16 matmuls about 40 % of their 989 TFLOP/s peak in a forward pass.
    host_copy_bytes_per_s = 2.5e10
    flops_per_s = 4.0e14
    # Beyond the measured activation peak: the decode graphs' shared pool and allocator
    # fragmentation, which the profile run does not see.
    UNMEASURED_RESERVE = 256 << 20

    @classmethod
    def is_available(cls) -> bool:
        try:
            return bool(torch.cuda.is_available()) and triton_importable()
        except Exception:  # a broken driver must read as "not available", never as a crash
            return False

    def device_count(self) -> int:
        return torch.cuda.device_count()

    def device_name(self, index: int = 0) -> str:
        return torch.cuda.get_device_name(index)

    def memory_info(self, index: int = 0) -> tuple[int, int]:
        free, total = torch.cuda.mem_get_info(index)
        return int(free), int(total)

    def default_dtype(self) -> torch.dtype:
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    def default_max_num_seqs(self) -> int:
        # The largest decode graph captured: a server at 256+ concurrent streams keeps them all in
        # one step, as vLLM's default does on large GPUs.
        return MAX_CAPTURE_SIZE

    def check_and_update_config(self, config: PlatformConfig) -> None:
        super().check_and_update_config(config)
        if config.dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            raise ValueError(f"{self.device_name()} has no bfloat16; use --dtype float16")
        # Which fp8 KV formats work is the attention backend's call (its supported_kv_cache_dtypes).

    def kv_cache_memory(self, requested_bytes: int | None, gpu_memory_utilization: float, non_kv_bytes: int) -> int:
        """``gpu_memory_utilization`` of the whole device, less what other processes hold, the
        engine's weights and measured activation peak, and a small reserve.

        Memory torch's caching allocator holds counts as ours (it is reused), so the answer does
        not depend on whether the weights are already loaded when the engine asks.
        """
        if requested_bytes is not None:
            return requested_bytes
        index = torch.cuda.current_device()
        free, total = self.memory_info(index)
        held_by_others = total - free - torch.cuda.memory_reserved(index)
        budget = int(total * gpu_memory_utilization) - held_by_others - non_kv_bytes - self.UNMEASURED_RESERVE
        return max(0, budget)

    def synchronize(self) -> None:
        torch.cuda.synchronize()

    def reset_peak_memory(self) -> None:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()

    def peak_memory_allocated(self) -> int | None:
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated())

    def graph_pool(self) -> Any:
        return torch.cuda.graph_pool_handle()

    def capture_graph(self, fn: Callable[[], torch.Tensor], pool: Any) -> tuple[Callable[[], None], torch.Tensor]:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            output = fn()
        return graph.replay, output
