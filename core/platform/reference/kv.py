"""KV-cache block copy (copy-on-write of shared prefix blocks, defragmentation)."""

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
