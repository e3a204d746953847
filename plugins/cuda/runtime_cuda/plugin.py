"""Entry point of the CUDA plugin (group ``runtime.platforms``, name ``cuda``).

The platform itself imports torch alone and reports itself unavailable on a machine without a
GPU (or without triton). The attention backend and kernels are runtime-triton's Triton code: they are imported and
registered only where the platform is available, so a CPU-only machine with this plugin
installed never pays for importing triton.
"""

from runtime.platform import hookimpl

from .communicator import NcclCommunicator
from .platform import CudaPlatform

RUNTIME_CONTRACT = ">=1.15,<2"  # runtime_triton registers propose_ngram_batched (1.15)


@hookimpl
def runtime_platforms():
    return [CudaPlatform]


@hookimpl
def runtime_attention_backends():
    if not CudaPlatform.is_available():
        return []
    from .backend import CudaTritonAttentionBackend

    return [CudaTritonAttentionBackend]


@hookimpl
def runtime_kernels():
    if not CudaPlatform.is_available():
        return []
    from runtime_triton.registry import kernels
    from runtime_triton.tile_plans.nvidia import PLANS

    return kernels("cuda", PLANS)


@hookimpl
def runtime_communicators():
    return [NcclCommunicator]


@hookimpl
def runtime_quantization_methods():
    from .quant import CudaAwqMethod, CudaCompressedTensorsMethod, CudaGgufMethod, CudaGptqMethod, Fp8Method

    return [CudaGgufMethod, Fp8Method, CudaGptqMethod, CudaAwqMethod, CudaCompressedTensorsMethod]
