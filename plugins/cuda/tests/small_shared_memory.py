"""A stand-in for a Triton kernel on a GPU with less shared memory than a plan asks for."""

from __future__ import annotations

from triton.runtime.errors import OutOfResources


class KernelFitting:
    """``kernel[grid](..., BLOCK_K=, num_stages=)`` that records ``(BLOCK_K, num_stages)`` in
    ``launches`` and, as Triton does at compile time, raises OutOfResources for a plan of more than
    ``max_stages`` stages or a K step deeper than ``max_k``."""

    def __init__(self, launches: list, max_stages: int, max_k: int):
        self.launches, self.max_stages, self.max_k = launches, max_stages, max_k

    def __getitem__(self, grid):
        def launch(*args, BLOCK_K, num_stages, **kwargs):
            self.launches.append((BLOCK_K, num_stages))
            if num_stages > self.max_stages or BLOCK_K > self.max_k:
                raise OutOfResources(196608, 167936, "shared memory")
        return launch
