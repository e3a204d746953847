"""Reference paged attention: one sequence at a time, dense math, obviously correct.

Cache layout is the default ``AttentionBackend.kv_cache_shape``: [2, blocks, block_size, Hkv, D].
"""

from __future__ import annotations

import math

import torch

from ..interface import AttentionBackend, AttentionMetadata


def write_kv(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store token t's K/V at flat slot ``slot_mapping[t]`` of the [2, blocks, bs, Hkv, D] cache;
    a negative slot (a padding token) stores nothing."""
    flat = kv_cache.view(2, -1, *kv_cache.shape[3:])
    real = (slot_mapping >= 0).nonzero().squeeze(1)
    slots = slot_mapping.index_select(0, real)
    # index_select / index_copy_, not advanced indexing: on the CPU, flat[0, slots] = key and
    # key[mask] took ~60 us per token (16 ms for a 256-token step), these take microseconds.
    for index, new in ((0, key), (1, value)):
        stored = _to_cache_dtype(new.index_select(0, real), kv_cache.dtype)
        if kv_cache.element_size() == 1:  # no index_copy_ for fp8 on the CPU: copy the bytes
            flat[index].view(torch.uint8).index_copy_(0, slots, stored.view(torch.uint8))
        else:
            flat[index].index_copy_(0, slots, stored)


def _to_cache_dtype(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The contract's store: fp8 caches saturate at the format's largest value (a plain cast
    gives inf for e5m2), every other dtype is a plain cast."""
    if dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        limit = torch.finfo(dtype).max
        values = values.float().clamp(-limit, limit)
    return values.to(dtype)


def gather_kv(kv_cache: torch.Tensor, block_ids: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``length`` cached K and V of a sequence whose blocks are ``block_ids``: [length, Hkv, D]."""
    block_size = kv_cache.shape[2]
    positions = torch.arange(length, device=kv_cache.device)
    slots = block_ids.long()[positions // block_size] * block_size + positions % block_size
    flat = kv_cache.view(2, -1, *kv_cache.shape[3:])
    return flat[0, slots], flat[1, slots]


def paged_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float, sliding_window: int | None = None,
                    logits_soft_cap: float | None = None, compute_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The contract's semantics, computed per sequence in ``compute_dtype``."""
    write_kv(key, value, kv_cache, meta.slot_mapping)
    num_heads = query.shape[1]
    out = torch.empty_like(query)
    starts = meta.query_start_loc.tolist()
    for i, seq_len in enumerate(meta.seq_lens.tolist()):
        q = query[starts[i]:starts[i + 1]].to(compute_dtype)
        q_len = q.shape[0]
        k, v = gather_kv(kv_cache, meta.block_table[i], seq_len)
        group = num_heads // k.shape[1]
        k = k.to(compute_dtype).repeat_interleave(group, dim=1)
        v = v.to(compute_dtype).repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
        if logits_soft_cap is not None:
            scores = logits_soft_cap * torch.tanh(scores / logits_soft_cap)
        q_pos = torch.arange(seq_len - q_len, seq_len).unsqueeze(1)
        k_pos = torch.arange(seq_len).unsqueeze(0)
        allowed = k_pos <= q_pos
        if sliding_window is not None:
            allowed &= k_pos > q_pos - sliding_window
        scores = scores.masked_fill(~allowed.to(scores.device), -math.inf)
        out[starts[i]:starts[i + 1]] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).to(query.dtype)
    return out


class ReferenceAttentionBackend(AttentionBackend):
    """The reference as a backend: every platform can fall back to it, and conformance compares with it."""

    name = "reference"
    platform = "*"
    priority = -100
    supported_dtypes = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
    supports_sliding_window = True
    supports_logits_soft_cap = True

    def forward(self, query, key, value, kv_cache, meta):
        return paged_attention(query, key, value, kv_cache, meta, self.spec.scale, self.spec.sliding_window,
                               self.spec.logits_soft_cap)
