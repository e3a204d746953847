"""Entry point of the Gaudi plugin (group ``runtime.platforms``, name ``gaudi``).

Importing this module never imports the HPU library: detection and fused-op selection do, when
asked. ``RUNTIME_EMULATE=gaudi`` registers the emulated platform (``runtime.platform.emulation``).
"""

from runtime.platform import hookimpl
from runtime.platform.distributed import TorchDistributedCommunicator
from runtime.platform.emulation import emulated
from runtime.platform.gguf_dequantize import GgufDequantizeMethod

from .attention import GaudiPagedAttentionBackend
from .ops import kernels
from .platform import EmulatedGaudiPlatform, GaudiPlatform

RUNTIME_CONTRACT = ">=1.11,<2"


class HcclCommunicator(TorchDistributedCommunicator):
    """torch.distributed's ``hccl`` backend, which ``habana_frameworks.torch.distributed.hccl`` registers."""

    platform = "gaudi"


class GaudiGgufMethod(GgufDequantizeMethod):
    platform = "gaudi"


def platform_class() -> type[GaudiPlatform]:
    return EmulatedGaudiPlatform if emulated("gaudi") else GaudiPlatform


@hookimpl
def runtime_platforms():
    return [platform_class()]


@hookimpl
def runtime_attention_backends():
    return [GaudiPagedAttentionBackend]


@hookimpl
def runtime_kernels():
    return kernels("gaudi") if platform_class().is_available() else []


@hookimpl
def runtime_communicators():
    return [HcclCommunicator]


@hookimpl
def runtime_quantization_methods():
    return [GaudiGgufMethod]
