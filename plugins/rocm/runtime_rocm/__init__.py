"""runtime-rocm: the ROCm platform plugin for runtime (AMD Instinct GPUs; Triton kernels, RCCL)."""

__version__ = "0.2.0"
