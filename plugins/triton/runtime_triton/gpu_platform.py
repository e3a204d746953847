"""What NVIDIA (CUDA) and AMD (ROCm/HIP) GPUs have in common through torch's ``torch.cuda`` API.

A ROCm build of torch answers the same ``torch.cuda`` calls as a CUDA build (HIP behind them):
device count and names, ``mem_get_info``, the caching allocator's statistics, streams, and graphs
(``torch.cuda.CUDAGraph`` records a HIP graph there). So both platforms size the KV cache, measure
peak memory and capture decode steps with this one class; each sets its name, detection and
what differs (dtypes, fp8 formats, tile plans). Imports torch alone, never triton.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from runtime.platform import Platform


class TorchCudaApiPlatform(Platform):
    """A GPU platform whose devices torch reaches as ``torch.device("cuda", i)``."""

    device_type = "cuda"
    supported_dtypes = (torch.bfloat16, torch.float16, torch.float32)
    supports_graphs = True
    # Beyond the measured activation peak: the decode graphs' shared pool and allocator
    # fragmentation, which the profile run does not see.
    UNMEASURED_RESERVE = 256 << 20

    def device_count(self) -> int:
        return torch.cuda.device_count()

    def device_name(self, index: int = 0) -> str:
        return torch.cuda.get_device_name(index)

    def memory_info(self, index: int = 0) -> tuple[int, int]:
        free, total = torch.cuda.mem_get_info(index)
        return int(free), int(total)

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
