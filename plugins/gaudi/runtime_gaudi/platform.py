"""The Gaudi platform: Intel Gaudi 2/3 HPUs through ``habana_frameworks.torch``.

Gaudi runs a step fastest as an HPU graph, and a graph is recorded per input shape, so steps are
padded to a few static-shape buckets (``runtime.platform.buckets``, the ladder the TPU uses) and
each bucket's graph is captured once.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from runtime.platform import Platform, PlatformConfig
from runtime.platform.buckets import token_buckets
from runtime.platform.emulation import EmulatedPlatform

from . import hpu


class GaudiPlatform(Platform):
    name = "gaudi"
    device_type = "hpu"
    priority = 90
    dist_backend = "hccl"
    supported_dtypes = (torch.bfloat16, torch.float32)
    static_shapes = True
    supports_graphs = True
    # Gaudi 3: PCIe 5.0 x16 to the host; bf16 matrix engines at 1835 TFLOP/s peak, about 30 % of it in a forward pass.
    host_copy_bytes_per_s = 2.5e10
    flops_per_s = 5.0e14

    def __init__(self):
        # Importing it registers torch.distributed's "hccl" backend, before any process group exists.
        hpu.module(f"{hpu.LIBRARY}.distributed.hccl")

    @classmethod
    def is_available(cls) -> bool:
        return cls.unavailable_reason() is None

    @classmethod
    def unavailable_reason(cls) -> str | None:
        device = hpu.module(f"{hpu.LIBRARY}.hpu")
        if device is None:
            return hpu.INSTALL
        try:
            if not device.is_available():
                return "no Gaudi device visible (check hl-smi and HABANA_VISIBLE_MODULES)"
        except Exception as exc:  # never raise from availability
            return f"the HPU runtime failed: {type(exc).__name__}: {exc}"
        return None

    def device_count(self) -> int:
        return hpu.module(f"{hpu.LIBRARY}.hpu").device_count()

    def device_name(self, index: int = 0) -> str:
        return hpu.module(f"{hpu.LIBRARY}.hpu").get_device_name(index)

    def memory_info(self, index: int = 0) -> tuple[int, int]:
        stats = hpu.module(f"{hpu.LIBRARY}.hpu").memory_stats(index)
        total = int(stats["Limit"])
        return total - int(stats["InUse"]), total

    def default_dtype(self) -> torch.dtype:
        return torch.bfloat16

    def default_max_num_seqs(self) -> int:
        return 128

    def check_and_update_config(self, config: PlatformConfig) -> None:
        super().check_and_update_config(config)
        config.static_shape_buckets = token_buckets(config.max_num_batched_tokens)

    def synchronize(self) -> None:
        hpu.module(f"{hpu.LIBRARY}.hpu").synchronize()

    def graph_pool(self) -> Any:
        return None  # each HPU graph owns its memory

    def capture_graph(self, fn: Callable[[], torch.Tensor], pool: Any) -> tuple[Callable[[], None], torch.Tensor]:
        graphs = hpu.module(f"{hpu.LIBRARY}.hpu.graphs")
        graph = graphs.HPUGraph()
        with graphs.graph(graph):
            output = fn()
        return graph.replay, output


class EmulatedGaudiPlatform(EmulatedPlatform, GaudiPlatform):
    """``RUNTIME_EMULATE=gaudi``: bucketing and config rules, the attention and (where the HPU
    library is absent) the reference ops, on the host CPU."""
