"""Entry point of the CPU plugin (group ``runtime.platforms``, name ``cpu``)."""

from runtime.platform import Kernel, hookimpl
from runtime.platform.distributed import TorchDistributedCommunicator

from .attention import CpuAttentionBackend
from .kernels import KERNELS
from .platform import CpuPlatform
from .quant import (CpuAwqMethod, CpuCompressedTensorsMethod, CpuFp8CheckpointMethod, CpuGgufMethod, CpuGptqMethod,
                    CpuInt8Method)

RUNTIME_CONTRACT = ">=1.0,<2"


class GlooCommunicator(TorchDistributedCommunicator):
    platform = "cpu"


@hookimpl
def runtime_platforms():
    return [CpuPlatform]


@hookimpl
def runtime_attention_backends():
    return [CpuAttentionBackend]


@hookimpl
def runtime_kernels() -> list[Kernel]:
    return KERNELS


@hookimpl
def runtime_communicators():
    return [GlooCommunicator]


@hookimpl
def runtime_quantization_methods():
    return [CpuGgufMethod, CpuInt8Method, CpuGptqMethod, CpuAwqMethod, CpuCompressedTensorsMethod, CpuFp8CheckpointMethod]
