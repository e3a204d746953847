"""The CUDA platform: NVIDIA GPUs through torch's CUDA build, kernels written in Triton."""

from __future__ import annotations

import importlib.util

import torch

from runtime.platform import PlatformConfig
from runtime.worker.decode_graphs import MAX_CAPTURE_SIZE
from runtime_triton.gpu_platform import TorchCudaApiPlatform


def triton_importable() -> bool:
    """Whether triton is installed, without importing it (an import costs time and may fail loudly)."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


class CudaPlatform(TorchCudaApiPlatform):
    """Memory, peak measurement and CUDA graphs: runtime-triton's ``TorchCudaApiPlatform``."""

    name = "cuda"
    priority = 100
    dist_backend = "nccl"

    supports_deterministic = True
    # --preemption-mode auto: an H100's pinned-memory copies over PCIe 5.0 reach about 25 GB/s
    # each way in practice, its bf16 matmuls about 40 % of their 989 TFLOP/s peak in a forward pass.
    host_copy_bytes_per_s = 2.5e10
    flops_per_s = 4.0e14

    @classmethod
    def is_available(cls) -> bool:
        return cls.unavailable_reason() is None

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if torch.version.hip is not None:
            return f"torch is a ROCm build (HIP {torch.version.hip}): AMD GPUs are the rocm platform (runtime[rocm])"
        if torch.version.cuda is None:
            return ("torch is a CPU-only build; install a CUDA build of torch "
                    "(https://pytorch.org/get-started/locally/)")
        try:
            if not torch.cuda.is_available():
                return "no NVIDIA GPU visible (torch.cuda.is_available() is False: driver, CUDA_VISIBLE_DEVICES)"
        except Exception as exc:  # a broken driver must read as "not available", never as a crash
            return f"the CUDA driver failed: {type(exc).__name__}: {exc}"
        if not triton_importable():
            return "triton is not installed (pip install triton)"
        return None

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
