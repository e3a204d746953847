"""KV-cache block copies: within the device cache (copy-on-write, defragmentation) and between
the device cache and a host copy of it (KV offload and preemption by swap)."""

import torch


def copy_blocks(kv_caches: list[torch.Tensor], src_to_dst: torch.Tensor, block_dim: int = 1) -> None:
    """In place, for every layer cache: block ``dst`` becomes a copy of block ``src``.

    ``src_to_dst`` is [N, 2] int64; ``block_dim`` is the backend's ``kv_cache_block_dim``.
    """
    if src_to_dst.numel() == 0:
        return
    src, dst = src_to_dst[:, 0], src_to_dst[:, 1]
    for cache in kv_caches:
        cache.index_copy_(block_dim, dst.to(cache.device), cache.index_select(block_dim, src.to(cache.device)))


def host_cache_shape(cache_shape: tuple[int, ...], block_dim: int, num_blocks: int) -> tuple[int, ...]:
    """Shape of the host copy of a layer cache of ``cache_shape``: ``num_blocks`` blocks, block
    first, so each block is one contiguous run of host memory (one DMA transfer each way)."""
    block = list(cache_shape)
    del block[block_dim]
    return (num_blocks, *block)


def swap_blocks(kv_caches: list[torch.Tensor], host_caches: list[torch.Tensor], pairs: torch.Tensor,
                block_dim: int = 1, to_host: bool = True) -> None:
    """Copy whole blocks between every layer's device cache and its host copy.

    ``pairs`` is [N, 2] int64 on the host, rows ``(device block, host block)``; ``host_caches[i]``
    is ``kv_caches[i]``'s host copy, of :func:`host_cache_shape`. ``to_host``: host block
    becomes a copy of device block (offload, swap-out); else the reverse (load, swap-in).
    """
    if pairs.numel() == 0:
        return
    device_ids, host_ids = pairs[:, 0], pairs[:, 1]
    for cache, host in zip(kv_caches, host_caches):
        ids = device_ids.to(cache.device)
        if to_host:
            host.index_copy_(0, host_ids, cache.index_select(block_dim, ids).movedim(block_dim, 0).to(host.device))
        else:
            cache.index_copy_(block_dim, ids, host.index_select(0, host_ids).movedim(0, block_dim).to(cache.device))
