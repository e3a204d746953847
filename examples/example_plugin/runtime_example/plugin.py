"""Entry point of the example plugin (group ``runtime.platforms``, name ``example``).

The runtime imports this module, checks RUNTIME_CONTRACT against its own contract version and
calls the hooks below; each returns a list of things that name the platform they serve.
"""

from runtime.platform import Kernel, hookimpl
from runtime.platform.distributed import TorchDistributedCommunicator

from . import kernels
from .attention import ExampleAttentionBackend
from .platform import ExamplePlatform

# The contract versions this plugin is written against: any 1.x, never 2.0.
RUNTIME_CONTRACT = ">=1.0,<2"


class ExampleCommunicator(TorchDistributedCommunicator):
    """Collectives through torch.distributed with ExamplePlatform.dist_backend (gloo)."""

    platform = "example"


@hookimpl
def runtime_platforms():
    return [ExamplePlatform]


@hookimpl
def runtime_attention_backends():
    return [ExampleAttentionBackend]


@hookimpl
def runtime_kernels():
    return [Kernel("example", "rms_norm", kernels.rms_norm), Kernel("example", "silu_and_mul", kernels.silu_and_mul)]


@hookimpl
def runtime_communicators():
    return [ExampleCommunicator]
