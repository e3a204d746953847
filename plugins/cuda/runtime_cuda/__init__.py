"""runtime-cuda: the CUDA platform plugin for runtime (Triton kernels, NCCL collectives)."""

__version__ = "0.2.0"
