"""Fault: an all_reduce that averages over the ranks instead of summing."""

from runtime.platform.distributed import TorchDistributedCommunicator

from ._cpu import cpu_plugin

PLATFORM = "broken-all-reduce"


class AveragingCommunicator(TorchDistributedCommunicator):
    def all_reduce(self, tensor):
        return super().all_reduce(tensor) / self.world_size


plugin = cpu_plugin(PLATFORM, communicator=AveragingCommunicator)
