"""Entry point of the ROCm plugin (group ``runtime.platforms``, name ``rocm``).

The platform imports torch alone and reports itself unavailable without a ROCm build of torch
and an AMD GPU. The attention backend and kernels (runtime-triton's, with the AMD tile plans)
are imported and registered only where the platform is available. ``RUNTIME_EMULATE=rocm``
registers the emulated platform instead (``runtime.platform.emulation``).
"""

from runtime.platform import hookimpl
from runtime.platform.emulation import emulated

from .communicator import RcclCommunicator
from .platform import EmulatedRocmPlatform, RocmPlatform

RUNTIME_CONTRACT = ">=1.15,<2"  # runtime_triton registers propose_ngram_batched (1.15)
DEVICE_ONLY_OPS = frozenset({"swap_blocks"})


def platform_class() -> type[RocmPlatform]:
    return EmulatedRocmPlatform if emulated("rocm") else RocmPlatform


@hookimpl
def runtime_platforms():
    return [platform_class()]


@hookimpl
def runtime_attention_backends():
    if not platform_class().is_available():
        return []
    from .backend import RocmTritonAttentionBackend

    return [RocmTritonAttentionBackend]


@hookimpl
def runtime_kernels():
    if not platform_class().is_available():
        return []
    from runtime_triton.registry import kernels
    from runtime_triton.tile_plans.amd import PLANS

    registered = kernels("rocm", PLANS)
    if emulated("rocm"):
        # Copies on a HIP side stream need the device; the host runs the reference's.
        registered = [k for k in registered if k.op not in DEVICE_ONLY_OPS]
    return registered


@hookimpl
def runtime_communicators():
    return [RcclCommunicator]


@hookimpl
def runtime_quantization_methods():
    from .quant import RocmFp8Method, RocmGgufMethod

    return [RocmGgufMethod, RocmFp8Method]
