"""Collectives between GPUs: torch.distributed over NCCL, through the core's shared implementation."""

from runtime.platform.distributed import TorchDistributedCommunicator


class NcclCommunicator(TorchDistributedCommunicator):
    """Tensors live on this rank's GPU; the process group is created with backend ``nccl``
    (``CudaPlatform.dist_backend``), so every collective runs on NVLink/PCIe through NCCL."""

    platform = "cuda"
