"""GGUF weights on CUDA: dequantize once on the host at load time, then multiply densely (cuBLAS).

Packed-block GPU kernels (keeping Q4 weights packed in device memory) would save memory, not
time at the batch sizes this serves first; they are a later step.
"""

from runtime.platform.gguf_dequantize import GgufDequantizeMethod


class CudaGgufMethod(GgufDequantizeMethod):
    platform = "cuda"
