"""KV block copies between the device cache and its pinned host copy, on a side stream.

The copies run on one side stream per device, so they overlap whatever the host does until the
compute stream reaches the next step; the compute stream waits for them before anything queued
after the call (the step that reads loaded blocks, or overwrites offloaded ones). The side
stream first waits for the compute stream's queued work, which may still write the blocks being
offloaded. Calls are ordered among themselves by the one side stream, so a host block written by
one call and read by a later one is never read early.
"""

from __future__ import annotations

import torch

_side_streams: dict[int, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _side_streams:
        _side_streams[index] = torch.cuda.Stream(device=index)
    return _side_streams[index]


def swap_blocks(kv_caches: list[torch.Tensor], host_caches: list[torch.Tensor], pairs: torch.Tensor,
                block_dim: int = 1, to_host: bool = True) -> None:
    if pairs.numel() == 0:
        return
    device = kv_caches[0].device
    compute = torch.cuda.current_stream(device)
    side = _side_stream(device)
    side.wait_stream(compute)
    host_ids = pairs[:, 1].tolist()
    with torch.cuda.stream(side):
        device_ids = pairs[:, 0].to(device)
        for cache, host in zip(kv_caches, host_caches):
            blocks = cache.movedim(block_dim, 0)
            # A gathered block is contiguous, and so is each host block: every transfer is one
            # asynchronous DMA between pinned memory and the device.
            staged = blocks[device_ids] if to_host else torch.empty((len(host_ids), *host.shape[1:]),
                                                                     dtype=cache.dtype, device=device)
            for row, host_id in enumerate(host_ids):
                if to_host:
                    host[host_id].copy_(staged[row], non_blocking=True)
                else:
                    staged[row].copy_(host[host_id], non_blocking=True)
            if not to_host:
                blocks[device_ids] = staged
    compute.wait_stream(side)
