"""runtime.platform.padded_attention (the static-shape paged attention of the TPU, Gaudi and Metal
plugins) against the reference's per-sequence float64 attention, on one mixed step: a prefill
after a prefix-cache hit, a fresh prompt and a decode, with padding tokens appended the way a
static-shape bucket pads a step. And the bucket ladder's bounds."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from runtime.platform import AttentionMetadata
from runtime.platform.buckets import bucket_for, sequence_buckets, token_buckets
from runtime.platform.padded_attention import padded_paged_attention, write_kv
from runtime.platform.reference import paged_attention

BLOCK, HEADS, KV_HEADS, HEAD = 4, 4, 2, 8
STEP = ((5, 3), (0, 4), (9, 1))  # (cached tokens, new tokens) of each sequence
PADDING = 3


def mixed_step(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    num_blocks = 1 + sum(-(-(c + n) // BLOCK) for c, n in STEP) + 2
    pool = (torch.randperm(num_blocks - 1, generator=g) + 1).tolist()  # block 0 is the null block
    starts, seq_lens, slots, tables = [0], [], [], []
    for cached, new in STEP:
        blocks = [pool.pop() for _ in range(-(-(cached + new) // BLOCK))]
        tables.append(blocks)
        starts.append(starts[-1] + new)
        seq_lens.append(cached + new)
        slots += [blocks[p // BLOCK] * BLOCK + p % BLOCK for p in range(cached, cached + new)]
    width = max(map(len, tables))
    tokens = starts[-1] + PADDING
    meta = AttentionMetadata(
        query_start_loc=torch.tensor(starts, dtype=torch.int32), seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_table=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        slot_mapping=torch.tensor(slots + [-1] * PADDING, dtype=torch.int64),
        max_query_len=max(n for _, n in STEP), max_seq_len=max(seq_lens),
        query_start_loc_cpu=starts, seq_lens_cpu=seq_lens)
    query = 2 * torch.randn(tokens, HEADS, HEAD, generator=g)
    key, value = torch.randn(tokens, KV_HEADS, HEAD, generator=g), torch.randn(tokens, KV_HEADS, HEAD, generator=g)
    cache = torch.randn(2, num_blocks, BLOCK, KV_HEADS, HEAD, generator=g)
    return query, key, value, cache, meta


def reference(query, key, value, cache, meta, **options):
    """The reference sees only the real tokens (it has no notion of padding rows)."""
    real = meta.query_start_loc_cpu[-1]
    ref_cache = cache.clone()
    ref_meta = AttentionMetadata(meta.query_start_loc, meta.seq_lens, meta.block_table, meta.slot_mapping[:real],
                                 meta.max_query_len, meta.max_seq_len, meta.query_start_loc_cpu, meta.seq_lens_cpu)
    out = paged_attention(query[:real], key[:real], value[:real], ref_cache, ref_meta, scale=HEAD ** -0.5, **options)
    return out, ref_cache


@pytest.mark.parametrize("options", [{}, {"sliding_window": 3}, {"logits_soft_cap": 5.0}, {"sdpa": True}, {"fp8": True}],
                         ids=["causal", "window", "soft-cap", "sdpa", "fp8-cache"])
def test_padded_attention_matches_the_reference(options):
    query, key, value, cache, meta = mixed_step()
    if options.pop("fp8", False):  # stored as bytes: the CPU has no index_copy_ for float8
        cache = cache.to(torch.float8_e4m3fn)
    expected, expected_cache = reference(query, key, value, cache, meta,
                                         **{k: v for k, v in options.items() if k != "sdpa"})
    sdpa = F.scaled_dot_product_attention if options.pop("sdpa", False) else None
    write_kv(key, value, cache, meta.slot_mapping)
    out = padded_paged_attention(query, cache, meta, "test", HEAD ** -0.5, sdpa=sdpa, **options)
    real = meta.query_start_loc_cpu[-1]
    torch.testing.assert_close(out[:real], expected, atol=1e-5, rtol=1e-5)
    # Padding tokens wrote nothing: the null block and every other slot are the reference's.
    assert torch.equal(cache.view(torch.uint8), expected_cache.view(torch.uint8))


def test_buckets_bound_padding_and_count():
    buckets = token_buckets(8192)
    assert buckets[0] == 16 and buckets[-1] == 8192 and len(buckets) == 10  # 16, 32, ..., 8192
    for size in range(1, 8193):
        bucket = bucket_for(size, buckets)
        assert size <= bucket <= max(16, 2 * size - 1)
    assert sequence_buckets(48) == (1, 2, 4, 8, 16, 32, 48)
    assert token_buckets(8) == (8,)
    with pytest.raises(ValueError, match="largest static-shape bucket 8192"):
        bucket_for(8193, buckets)
