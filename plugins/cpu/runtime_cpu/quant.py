"""GGUF weights on the CPU: dequantize once at load time, then multiply densely.

A dense matmul on dequantized weights is what PyTorch's CPU kernels are fastest at for the
small models this platform serves; packed-block kernels would save memory, not time.
"""

from runtime.platform.gguf_dequantize import GgufDequantizeMethod


class CpuGgufMethod(GgufDequantizeMethod):
    platform = "cpu"
