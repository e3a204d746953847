"""The ROCm platform: AMD Instinct GPUs through torch's ROCm build (HIP behind ``torch.cuda``)."""

from __future__ import annotations

import importlib.util
import os

import torch

from runtime.platform import PlatformConfig
from runtime.platform.emulation import EmulatedPlatform
from runtime.worker.decode_graphs import MAX_CAPTURE_SIZE
from runtime_triton.gpu_platform import TorchCudaApiPlatform

from .arch import base_arch, fp8_dtype

ROCM_TORCH = "https://download.pytorch.org/whl/rocm6.4"
EMULATED_ARCH_ENV = "RUNTIME_ROCM_ARCH"
"""The architecture an emulated ROCm platform claims (default gfx942, MI300)."""


class RocmPlatform(TorchCudaApiPlatform):
    """Memory, peak measurement and HIP graphs (``torch.cuda.CUDAGraph`` on ROCm) come from
    runtime-triton's ``TorchCudaApiPlatform``; RCCL is torch.distributed's ``nccl`` backend there."""

    name = "rocm"
    priority = 100
    dist_backend = "nccl"
    # --preemption-mode auto: an MI300X's host link is PCIe 5.0 x16 (about 25 GB/s each way in
    # practice); its bf16 matrix cores peak at 1307 TFLOP/s, about 40 % of which a forward pass reaches.
    host_copy_bytes_per_s = 2.5e10
    flops_per_s = 5.0e14

    @classmethod
    def is_available(cls) -> bool:
        return cls.unavailable_reason() is None

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if torch.version.hip is None:
            return f"torch is not a ROCm build (torch.version.hip is unset); install torch from {ROCM_TORCH}"
        try:
            if torch.cuda.device_count() == 0:
                return "no AMD GPU visible to HIP (check HIP_VISIBLE_DEVICES / ROCR_VISIBLE_DEVICES and access to /dev/kfd)"
        except Exception as exc:  # a broken driver must read as "not available", never as a crash
            return f"the HIP runtime failed: {type(exc).__name__}: {exc}"
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed (pip install triton: its wheels carry the AMD backend)"
        return None

    def arch(self, index: int = 0) -> str:
        """The GPU's architecture, e.g. ``"gfx942"``."""
        return base_arch(torch.cuda.get_device_properties(index).gcnArchName)

    def fp8_dtype(self) -> torch.dtype | None:
        """The e4m3 type this GPU computes in (``float8_e4m3fnuz`` on MI300), or None."""
        return fp8_dtype(self.arch())

    def default_dtype(self) -> torch.dtype:
        return torch.bfloat16

    def default_max_num_seqs(self) -> int:
        return MAX_CAPTURE_SIZE

    def check_and_update_config(self, config: PlatformConfig) -> None:
        super().check_and_update_config(config)
        # Which fp8 KV formats work is the attention backend's call (it knows the architecture).


class EmulatedRocmPlatform(EmulatedPlatform, RocmPlatform):
    """``RUNTIME_EMULATE=rocm``: the platform on the host CPU, runtime-triton's kernels with the
    AMD tile plans under Triton's interpreter (``TRITON_INTERPRET=1``)."""

    # Triton's interpreter multiplies bfloat16 tl.dot operands as raw bits (runtime-cuda's tests say
    # where): emulation checks float32 and float16.
    supported_dtypes = (torch.float32, torch.float16)

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if os.environ.get("TRITON_INTERPRET") != "1":
            return "emulated rocm runs its Triton kernels under Triton's interpreter: set TRITON_INTERPRET=1"
        return None

    @classmethod
    def is_available(cls) -> bool:
        return cls.unavailable_reason() is None

    def arch(self, index: int = 0) -> str:
        return os.environ.get(EMULATED_ARCH_ENV, "gfx942")

    def default_dtype(self) -> torch.dtype:
        return torch.float32
