"""A Communicator over torch.distributed, shared by platforms whose backend speaks it
(gloo, NCCL, RCCL, HCCL, ...): a plugin subclasses it and names its platform."""

from __future__ import annotations

import torch
import torch.distributed as dist

from .interface import Communicator


class TorchDistributedCommunicator(Communicator):
    """Collectives on ``group`` (the default process group when None)."""

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group)

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.group)
        return out

    def all_gather(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim)

    def reduce_scatter(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        if tensor.shape[dim] % self.world_size:
            raise ValueError(f"reduce_scatter: dimension {dim} of size {tensor.shape[dim]} does not split into {self.world_size}")
        # gloo has no reduce_scatter, so every backend gets the same all_reduce-then-slice semantics.
        summed = self.all_reduce(tensor)
        return summed.chunk(self.world_size, dim=dim)[self.rank].contiguous()

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        out = tensor.clone()
        dist.broadcast(out, src=src, group=self.group)
        return out

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        dist.send(tensor.contiguous(), dst=dst, group=self.group)

    def recv(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        dist.recv(tensor, src=src, group=self.group)
        return tensor

    def isend(self, tensor: torch.Tensor, dst: int) -> dist.Work:
        return dist.isend(tensor.contiguous(), dst=dst, group=self.group)

    def barrier(self) -> None:
        dist.barrier(group=self.group)
