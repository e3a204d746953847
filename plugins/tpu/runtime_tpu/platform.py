"""The TPU platform: Google TPUs through torch-xla.

XLA compiles a whole step's graph and runs it; a new input shape means a new compilation. So
every step is padded to one of a few static-shape buckets (``PlatformConfig.static_shape_buckets``,
``runtime.platform.buckets``), the attention is written so shapes follow from the bucket alone
(``runtime.platform.padded_attention``: no host syncs, no data-dependent sizes), and compiled
programs are cached on disk across runs (``torch_xla.runtime.initialize_cache``).

``PJRT_DEVICE=CPU`` makes torch-xla run the same XLA programs on the host (XLA:CPU): the platform
accepts it, so the conformance suite and end-to-end checks run the real XLA path on a machine
without a TPU. Automatic selection still prefers a real accelerator (see ``priority``).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from runtime.platform import Platform, PlatformConfig
from runtime.platform.buckets import token_buckets
from runtime.platform.emulation import EmulatedPlatform, host_memory

from . import xla

CACHE_DIR_ENV = "RUNTIME_XLA_CACHE"
"""Where compiled XLA programs persist (default ~/.cache/runtime/xla)."""


class TpuPlatform(Platform):
    name = "tpu"
    device_type = "xla"
    priority = 90
    dist_backend = "xla"
    supported_dtypes = (torch.bfloat16, torch.float32)
    static_shapes = True
    inference_mode = False  # torch-xla cannot take views of ordinary tensors under it: no_grad instead
    # v5e: PCIe 4.0 to the host; 197 bf16 TFLOP/s per chip, about 40 % of it in a forward pass.
    host_copy_bytes_per_s = 2.0e10
    flops_per_s = 8.0e13

    _cache_ready = False

    @classmethod
    def is_available(cls) -> bool:
        return cls.unavailable_reason() is None

    @classmethod
    def unavailable_reason(cls) -> str | None:
        runtime = xla.module("torch_xla.runtime")
        if runtime is None:
            return xla.INSTALL
        pjrt = xla.pjrt_device()
        if pjrt == "CPU":
            return None  # XLA:CPU, asked for explicitly: the same programs on the host
        try:
            found = runtime.device_type()
        except Exception as exc:  # never raise from availability
            return f"torch_xla found no device: {type(exc).__name__}: {exc}"
        if found != "TPU":
            return f"no TPU: torch_xla's device is {found} (PJRT_DEVICE={pjrt or 'unset'}); PJRT_DEVICE=CPU runs XLA on the host"
        return None

    def __init__(self):
        self._init_compilation_cache()
        # Importing it registers torch.distributed's "xla" backend, before any process group exists.
        xla.module("torch_xla.distributed.xla_backend")

    @classmethod
    def _init_compilation_cache(cls) -> None:
        """Persist compiled programs: a restart then loads each bucket's program instead of compiling it."""
        runtime = xla.module("torch_xla.runtime")
        if cls._cache_ready or runtime is None or not hasattr(runtime, "initialize_cache"):
            return
        path = Path(os.environ.get(CACHE_DIR_ENV, Path.home() / ".cache" / "runtime" / "xla"))
        path.mkdir(parents=True, exist_ok=True)
        try:
            runtime.initialize_cache(str(path), readonly=False)
        except RuntimeError:
            pass  # already initialized in this process (by the user or an earlier engine): that cache serves
        cls._cache_ready = True

    def device(self, index: int = 0) -> torch.device:
        return xla.module("torch_xla").device()

    def device_count(self) -> int:
        return xla.module("torch_xla.runtime").global_runtime_device_count()

    def device_name(self, index: int = 0) -> str:
        kind = xla.module("torch_xla.runtime").device_type()
        return f"{kind} (XLA)" if kind != "CPU" else "XLA:CPU (the host, PJRT_DEVICE=CPU)"

    def memory_info(self, index: int = 0) -> tuple[int, int]:
        if xla.pjrt_device() == "CPU":
            return host_memory()
        info = xla.module("torch_xla.core.xla_model").get_memory_info(self.device(index))
        total = int(info["bytes_limit"])
        return total - int(info["bytes_used"]), total

    def kv_cache_memory(self, requested_bytes: int | None, gpu_memory_utilization: float, non_kv_bytes: int) -> int:
        if requested_bytes is not None:
            return requested_bytes
        free, total = self.memory_info()
        if xla.pjrt_device() == "CPU":
            return int(min(max(free - non_kv_bytes, 0) // 4, EmulatedPlatform.KV_CACHE_CAP))
        return max(0, int(total * gpu_memory_utilization) - (total - free) - non_kv_bytes)

    def default_dtype(self) -> torch.dtype:
        return torch.bfloat16

    def default_max_num_seqs(self) -> int:
        return 128

    def check_and_update_config(self, config: PlatformConfig) -> None:
        super().check_and_update_config(config)
        if config.kv_cache_dtype != "auto":
            raise ValueError(f"--kv-cache-dtype {config.kv_cache_dtype} is not supported on tpu; use auto")
        if config.enable_lora:
            raise ValueError("LoRA adapters are not supported on tpu yet: serve the model without --enable-lora")
        config.static_shape_buckets = token_buckets(config.max_num_batched_tokens)

    def synchronize(self) -> None:
        xla.module("torch_xla.core.xla_model").wait_device_ops()

    def mark_step(self) -> None:
        # Every live tensor's pending graph in one program: the step's outputs and its cache writes.
        xla.module("torch_xla").sync()


class EmulatedTpuPlatform(EmulatedPlatform, TpuPlatform):
    """``RUNTIME_EMULATE=tpu``: bucketing, config rules and the XLA-shaped attention on the host
    CPU through eager torch, without torch-xla (XLA:CPU is the stronger check where torch-xla installs)."""

    def __init__(self):
        pass  # no torch-xla, no compilation cache
