"""Paged attention in plain torch with every shape fixed by the inputs' shapes: no host syncs,
no data-dependent sizes. What compilers that trace a whole step need (XLA on TPU, HPU graphs on
Gaudi), and what SDPA-only devices (Apple's MPS) can run.

The reference (``reference.attention``) walks sequences on the host; this gathers each
sequence's whole block table at once (``block_table.shape[1] * block_size`` keys, masked past
its length), finds each query token's sequence on the device from ``query_start_loc``, and
computes every token against its own sequence's keys. Memory is ``tokens x keys x kv_heads x
head_size``: correct for any batch, and fast where a platform pads steps to a few shapes; a
platform's fused kernel (Pallas ragged paged attention, Gaudi's FusedSDPA) is the fast path.

Padding tokens (slot -1) must write nothing: a scatter cannot skip rows without a
data-dependent shape, so they rewrite slot 0 of block 0, the engine's null block, with what it
already holds.
"""

from __future__ import annotations

from typing import Callable

import torch

from .interface import AttentionMetadata

Sdpa = Callable[..., torch.Tensor]
"""``(query, key, value, attn_mask=bool mask, scale=float) -> out`` with
``torch.nn.functional.scaled_dot_product_attention``'s semantics (True = may attend)."""


def write_kv(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store the new K/V at ``slot_mapping`` of the [2, blocks, block_size, Hkv, D] cache, in place."""
    # fp8 caches are moved as their bytes: the CPU has no index_copy_ for float8 types. Only
    # those: torch-xla runs a dtype view on the host, which would cut the step's graph per layer.
    fp8 = kv_cache.element_size() == 1
    raw = kv_cache.view(torch.uint8) if fp8 else kv_cache
    flat = raw.view(2, -1, *kv_cache.shape[3:])
    valid = (slot_mapping >= 0)[:, None, None]
    slots = slot_mapping.clamp(min=0)
    for index, new in ((0, key), (1, value)):
        stored = _to_cache_dtype(new, kv_cache.dtype)
        stored = stored.view(torch.uint8) if fp8 else stored
        kept = flat[index].index_select(0, slots)
        flat[index].index_copy_(0, slots, torch.where(valid, stored, kept))


def _to_cache_dtype(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp8 caches saturate at the format's largest value (the contract's store), others cast."""
    if dtype.itemsize == 1:
        limit = torch.finfo(dtype).max
        values = values.float().clamp(-limit, limit)
    return values.to(dtype)


def step_layout(meta: AttentionMetadata, tokens: int, block_size: int) -> tuple[torch.Tensor, ...]:
    """(slots [B, L] of each sequence's keys, sequence [T] and position [T] of each query token,
    visible [T, L]: the causal mask without the window): what every layer of a step shares."""
    device = meta.block_table.device
    batch, width = meta.block_table.shape
    positions = torch.arange(width * block_size, device=device)
    slots = meta.block_table.long()[:, positions // block_size] * block_size + positions % block_size
    token = torch.arange(tokens, device=device)
    starts = meta.query_start_loc.long()
    # Rows past the last sequence's tokens (padding a step to a fixed size) count as the last sequence's.
    sequence = (token[:, None] >= starts[None, 1:batch]).sum(1)
    seq_lens = meta.seq_lens.long()[sequence]
    query_position = seq_lens - (starts[sequence + 1] - starts[sequence]) + (token - starts[sequence])
    visible = (positions[None, :] <= query_position[:, None]) & (positions[None, :] < seq_lens[:, None])
    return slots, sequence, query_position, visible


def padded_paged_attention(query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, layout_key: object,
                           scale: float, sliding_window: int | None = None, logits_soft_cap: float | None = None,
                           sdpa: Sdpa | None = None) -> torch.Tensor:
    """Each query token [T, H, D] attends to its own sequence's cached keys (its new K/V already
    written). ``sdpa`` computes the product (no soft-capping then); without it, float32 einsums.
    ``layout_key`` names this layer's layout in ``meta.backend_cache`` (one layout per step)."""
    tokens, num_heads, head_size = query.shape
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    layout = meta.backend_cache.get(layout_key)
    if layout is None:
        layout = meta.backend_cache[layout_key] = step_layout(meta, tokens, block_size)
    slots, sequence, query_position, visible = layout
    if sliding_window is not None:
        keys = torch.arange(visible.shape[1], device=visible.device)
        visible = visible & (keys[None, :] > query_position[:, None] - sliding_window)
    flat = kv_cache.view(2, -1, num_kv_heads, head_size)
    # [T, L, Hkv, D]: every token's sequence's keys, widened from an fp8 cache to the query's dtype.
    key = flat[0][slots].index_select(0, sequence).to(query.dtype)
    value = flat[1][slots].index_select(0, sequence).to(query.dtype)
    group = num_heads // num_kv_heads
    q = query.view(tokens, num_kv_heads, group, head_size)
    if sdpa is not None:
        out = sdpa(q, key.transpose(1, 2), value.transpose(1, 2), attn_mask=visible[:, None, None, :], scale=scale)
        return out.reshape(tokens, num_heads, head_size)
    scores = torch.einsum("tkgd,tlkd->tkgl", q.float(), key.float()) * scale
    if logits_soft_cap is not None:
        scores = logits_soft_cap * torch.tanh(scores / logits_soft_cap)
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    out = torch.einsum("tkgl,tlkd->tkgd", scores.softmax(-1), value.float())
    return out.reshape(tokens, num_heads, head_size).to(query.dtype)
