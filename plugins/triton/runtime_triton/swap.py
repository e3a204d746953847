"""KV block copies between the device cache and its pinned host copy, on a side stream.

Pinned host memory is mapped into the GPU's address space (unified addressing), so a copy is one
gather-scatter kernel per layer that reads or writes the host blocks over the bus directly: a
2048-token prefix of a 32-layer model is 32 launches, where one DMA per block and layer was 4096
calls, about as long as recomputing the prefix. Host memory that is not pinned (pinning failed)
takes one DMA per block through a staging tensor.

The copies run on one side stream per device, so they overlap whatever the host does until the
compute stream reaches the next step; the compute stream waits for them before anything queued
after the call (the step that reads loaded blocks, or overwrites offloaded ones). The side
stream first waits for the compute stream's queued work, which may still write the blocks being
offloaded. Calls are ordered among themselves by the one side stream, so a host block written by
one call and read by a later one is never read early.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)
_side_streams: dict[int, torch.cuda.Stream] = {}
_mapped: dict[tuple, torch.Tensor | None] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _side_streams:
        _side_streams[index] = torch.cuda.Stream(device=index)
    return _side_streams[index]


class _HostArray:
    """``__cuda_array_interface__`` of a pinned host tensor's bytes: torch wraps it as a CUDA
    tensor over the same memory (no copy), which kernels read and write over the bus."""

    def __init__(self, host: torch.Tensor):
        self.__cuda_array_interface__ = {"shape": (host.numel() * host.element_size(),), "typestr": "|u1",
                                         "data": (host.data_ptr(), False), "version": 3, "strides": None}


def _words(t: torch.Tensor) -> torch.Tensor:
    """``t`` (last dimension contiguous) viewed as 8-byte words where its rows allow, else as
    bytes: the gather moves one word a thread."""
    row = t.shape[-1] * t.element_size()
    return t.view(torch.uint8).view(torch.int64 if row % 8 == 0 else torch.uint8)


def _device_view(host: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """``host`` as a CUDA tensor over the same memory, or None when it is not pinned."""
    key = (host.data_ptr(), tuple(host.shape), host.dtype, device)
    if key not in _mapped:
        _mapped[key] = None
        if host.is_pinned() and host.is_contiguous():
            try:
                flat = torch.as_tensor(_HostArray(host), device=device)
            except RuntimeError as error:  # a driver without unified addressing of pinned memory
                logger.warning("KV offload copies one block at a time: pinned host memory is not mapped "
                               "into the GPU's address space here (%s)", error)
                return None
            _mapped[key] = flat.view(host.dtype).view(host.shape)
    return _mapped[key]


def swap_blocks(kv_caches: list[torch.Tensor], host_caches: list[torch.Tensor], pairs: torch.Tensor,
                block_dim: int = 1, to_host: bool = True) -> None:
    if pairs.numel() == 0:
        return
    device = kv_caches[0].device
    compute = torch.cuda.current_stream(device)
    side = _side_stream(device)
    side.wait_stream(compute)
    with torch.cuda.stream(side):
        ids = pairs.to(device, non_blocking=True)
        device_ids, host_ids = ids[:, 0], ids[:, 1]
        for cache, host in zip(kv_caches, host_caches):
            blocks = cache.movedim(block_dim, 0)
            mapped = _device_view(host, device)
            if mapped is None:
                _copy_through_staging(blocks, host, device_ids, pairs[:, 1].tolist(), to_host)
            elif to_host:
                _words(mapped).index_copy_(0, host_ids, _words(blocks).index_select(0, device_ids))
            else:
                _words(blocks).index_copy_(0, device_ids, _words(mapped).index_select(0, host_ids))
    compute.wait_stream(side)


def _copy_through_staging(blocks: torch.Tensor, host: torch.Tensor, device_ids: torch.Tensor, host_ids: list[int],
                          to_host: bool) -> None:
    """One DMA per block between pageable host memory and a contiguous device staging tensor."""
    staged = blocks[device_ids] if to_host else torch.empty((len(host_ids), *host.shape[1:]), dtype=blocks.dtype,
                                                            device=blocks.device)
    for row, host_id in enumerate(host_ids):
        if to_host:
            host[host_id].copy_(staged[row], non_blocking=True)
        else:
            staged[row].copy_(host[host_id], non_blocking=True)
    if not to_host:
        blocks[device_ids] = staged
