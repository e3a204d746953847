"""Entry point of the Metal plugin (group ``runtime.platforms``, name ``metal``).

No kernels are registered: the reference ops are plain torch, which MPS runs. No communicator
either: a Mac has one GPU, so ``--tensor-parallel-size`` > 1 fails with the registry's message
("registers no communicator"). ``RUNTIME_EMULATE=metal`` registers the emulated platform.
"""

from runtime.platform import hookimpl
from runtime.platform.emulation import emulated
from runtime.platform.gguf_dequantize import GgufDequantizeMethod

from .attention import MetalSdpaAttentionBackend
from .platform import EmulatedMetalPlatform, MetalPlatform

RUNTIME_CONTRACT = ">=1.11,<2"


class MetalGgufMethod(GgufDequantizeMethod):
    platform = "metal"


@hookimpl
def runtime_platforms():
    return [EmulatedMetalPlatform if emulated("metal") else MetalPlatform]


@hookimpl
def runtime_attention_backends():
    return [MetalSdpaAttentionBackend]


@hookimpl
def runtime_quantization_methods():
    return [MetalGgufMethod]
