"""Entry point of the TPU plugin (group ``runtime.platforms``, name ``tpu``).

Importing this module never imports torch-xla; detection does, when asked.
``RUNTIME_EMULATE=tpu`` registers the emulated platform (``runtime.platform.emulation``).
"""

from runtime.platform import hookimpl
from runtime.platform.distributed import TorchDistributedCommunicator
from runtime.platform.emulation import emulated
from runtime.platform.gguf_dequantize import GgufDequantizeMethod

from .attention import XlaPagedAttentionBackend
from .platform import EmulatedTpuPlatform, TpuPlatform

RUNTIME_CONTRACT = ">=1.12,<2"


class XlaCommunicator(TorchDistributedCommunicator):
    """torch.distributed's ``xla`` backend (``torch_xla.distributed.xla_backend``): collectives
    become XLA ops inside the step's graph, over the TPU interconnect (ICI)."""

    platform = "tpu"


class TpuGgufMethod(GgufDequantizeMethod):
    platform = "tpu"


@hookimpl
def runtime_platforms():
    return [EmulatedTpuPlatform if emulated("tpu") else TpuPlatform]


@hookimpl
def runtime_attention_backends():
    return [XlaPagedAttentionBackend]


@hookimpl
def runtime_communicators():
    return [XlaCommunicator]


@hookimpl
def runtime_quantization_methods():
    return [TpuGgufMethod]
