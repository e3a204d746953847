"""Arrival counters for kernels whose last program of a tile finishes the tile's work (split-K
sums: the W4A16 vector and tile kernels, the LoRA shrink of ``linear_lora``, split attention's
merge).

Per device one int32 buffer, zero between launches: the last program to arrive at a counter
resets it, so it is allocated and zeroed once, before any CUDA-graph capture, and shared by every
such kernel. Launches that use it must not overlap: the engine runs a device's forward passes on
one stream, one kernel after another, and a programmatic dependent (``dependent.py``) takes its
tickets only after its wait.
"""

from __future__ import annotations

import torch

TICKETS: dict[torch.device, torch.Tensor] = {}


def tickets(device: torch.device, count: int) -> torch.Tensor:
    """The device's counters, at least ``count`` of them, all zero."""
    counters = TICKETS.get(device)
    if counters is None or counters.numel() < count:
        counters = TICKETS[device] = torch.zeros(max(count, 1 << 16), dtype=torch.int32, device=device)
    return counters
