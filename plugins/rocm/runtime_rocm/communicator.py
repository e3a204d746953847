"""Collectives between AMD GPUs: torch.distributed's ``nccl`` backend, which is RCCL on a ROCm build."""

from runtime.platform.distributed import TorchDistributedCommunicator


class RcclCommunicator(TorchDistributedCommunicator):
    """Tensors live on this rank's GPU; the process group's backend is ``nccl``
    (``RocmPlatform.dist_backend``): RCCL over Infinity Fabric or PCIe."""

    platform = "rocm"
