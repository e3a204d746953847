"""Batch-invariant paged attention for ``--deterministic`` (contract 1.10).

Every query token is computed as a row of its own: its query against the first P keys of its
sequence, P fixed by the token's context length alone (:func:`key_bucket`), keys past the context
masked. So a token's output is the same whether it arrives in a decode batch of any size, in a
prefill chunk of any length, or alone. torch's SDPA and matmul are not (their blocking depends on
how many rows and keys a call gets), so both products are broadcast multiplies reduced along the
innermost dimension: each output element's sum then has an order fixed by D or P only.
Rows are processed in chunks that keep the [rows, heads, P, D] product under a memory budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

PRODUCT_ELEMENTS = 1 << 24
"""Most float32 elements of one chunk's broadcast product (64 MiB)."""


def key_bucket(context_len: int) -> int:
    """Keys one token attends over, padded: 64, then powers of two up to 512, then multiples of 512."""
    if context_len <= 64:
        return 64
    if context_len <= 512:
        return 1 << (context_len - 1).bit_length()
    return -(-context_len // 512) * 512


@dataclass
class RowGroup:
    """Query rows that attend over the same number of padded keys ``P``."""

    rows: torch.Tensor
    """[n] int64 token rows of the batch."""
    blocks: torch.Tensor
    """[n or 1, ceil(P / block_size)] block ids of each row's sequence (1: all rows share one)."""
    allowed: torch.Tensor
    """[n, P] True where a row sees the key."""
    valid: torch.Tensor
    """[n or 1, P] True where the gathered key holds a written slot (the rest is zeroed)."""


def _mask(q_pos: torch.Tensor, keys: int, window: int | None) -> torch.Tensor:
    key_pos = torch.arange(keys, device=q_pos.device)
    allowed = key_pos <= q_pos.unsqueeze(-1)
    if window is not None:
        allowed &= key_pos > q_pos.unsqueeze(-1) - window
    return allowed


def _blocks(block_table_rows: torch.Tensor, keys: int, block_size: int) -> torch.Tensor:
    """The first ceil(keys / block_size) block ids of each row, the null block 0 past the table's end."""
    needed = -(-keys // block_size)
    have = block_table_rows[:, :needed].long()
    return torch.nn.functional.pad(have, (0, needed - have.shape[1])) if have.shape[1] < needed else have


def plan_rows(starts: list[int], seq_lens: list[int], block_table: torch.Tensor, block_size: int,
              window: int | None) -> list[RowGroup]:
    """The step's row groups: decode tokens of every sequence grouped by bucket; each multi-token
    sequence's tokens grouped by bucket with one shared gather."""
    device = block_table.device
    decode: dict[int, list[int]] = {}
    groups = []
    for i, seq_len in enumerate(seq_lens):
        q_len = starts[i + 1] - starts[i]
        if q_len == 1:
            decode.setdefault(key_bucket(seq_len), []).append(i)
            continue
        first = seq_len - q_len
        positions = list(range(first, seq_len))
        buckets = [key_bucket(p + 1) for p in positions]
        for keys in sorted(set(buckets)):
            rows = [starts[i] + j for j, b in enumerate(buckets) if b == keys]
            q_pos = torch.tensor([positions[r - starts[i]] for r in rows], device=device)
            groups.append(RowGroup(torch.tensor(rows, device=device),
                                   _blocks(block_table[i:i + 1], keys, block_size),
                                   _mask(q_pos, keys, window),
                                   (torch.arange(keys, device=device) < seq_len).unsqueeze(0)))
    for keys, seqs in sorted(decode.items()):
        index = torch.tensor(seqs, device=device)
        q_pos = torch.tensor([seq_lens[i] - 1 for i in seqs], device=device)
        groups.append(RowGroup(torch.tensor([starts[i] for i in seqs], device=device),
                               _blocks(block_table[index], keys, block_size), _mask(q_pos, keys, window),
                               torch.arange(keys, device=device) <= q_pos.unsqueeze(-1)))
    return groups


def attend_rows(query: torch.Tensor, kv_cache: torch.Tensor, group: RowGroup, scale: float,
                soft_cap: float | None) -> torch.Tensor:
    """query [T, H, D] -> [n, H, D] float32 for the group's rows."""
    keys = group.allowed.shape[1]
    kv = gather_blocks(kv_cache, group.blocks, keys).float()  # [2, n or 1, P, Hkv, D]
    kv = kv.masked_fill_(~group.valid[None, :, :, None, None], 0)  # unwritten slots may hold NaN
    k = kv[0].permute(0, 2, 1, 3).unsqueeze(2)  # [n or 1, Hkv, 1, P, D]
    v = kv[1].permute(0, 2, 3, 1).unsqueeze(2)  # [n or 1, Hkv, 1, D, P]
    heads, dim = query.shape[1], query.shape[2]
    kv_heads = k.shape[1]
    step = max(1, PRODUCT_ELEMENTS // (heads * keys * dim))
    out = []
    for begin in range(0, group.rows.shape[0], step):
        rows = group.rows[begin:begin + step]
        n = rows.shape[0]
        q = query[rows].float().view(n, kv_heads, heads // kv_heads, 1, dim)
        shared = k.shape[0] == 1
        k_rows = k if shared else k[begin:begin + step]
        v_rows = v if shared else v[begin:begin + step]
        scores = torch.mul(q, k_rows).sum(-1).mul_(scale)  # [n, Hkv, group, P]
        if soft_cap is not None:
            scores = soft_cap * torch.tanh(scores / soft_cap)
        allowed = group.allowed[begin:begin + step][:, None, None]
        probs = scores.masked_fill_(~allowed, -math.inf).softmax(-1)
        out.append(torch.mul(probs.unsqueeze(-2), v_rows).sum(-1).view(n, heads, dim))
    return torch.cat(out)


def gather_blocks(kv_cache: torch.Tensor, block_ids: torch.Tensor, length: int,
                  blocks_index: torch.Tensor | None = None) -> torch.Tensor:
    """block_ids [N, max_blocks] -> [2, N, length, Hkv, D]: the first ``length`` K/V of each row's blocks
    (unpacked as K, V by the callers). ``blocks_index``: ``block_index``'s result for these arguments,
    where the caller keeps it for every layer of a step."""
    two, cache_blocks, block_size = kv_cache.shape[:3]
    if blocks_index is None:
        blocks_index = block_index(block_ids, length, block_size, cache_blocks)
    # index_select over whole blocks as rows copies each block with one memcpy: 4x faster than
    # advanced indexing's per-element copy (16 decode rows of 260 tokens, SmolLM2-135M's cache).
    blocks = kv_cache.view(two * cache_blocks, -1).index_select(0, blocks_index)
    return blocks.view(two, block_ids.shape[0], -1, *kv_cache.shape[3:])[:, :, :length]


def block_index(block_ids: torch.Tensor, length: int, block_size: int, cache_blocks: int) -> torch.Tensor:
    """The rows of ``kv_cache.view(2 * cache_blocks, -1)`` holding the blocks of each row's first
    ``length`` keys: every row's K blocks, then their V blocks."""
    ids = block_ids[:, :-(-length // block_size)].reshape(-1)
    return torch.cat((ids, ids + cache_blocks))
