"""CpuAttentionBackend against the core's reference paged attention (float64 math).

Every batch lives in a randomly filled paged cache whose blocks are handed out in shuffled
order, so a backend that assumed contiguous or ordered blocks, or read past a sequence's
length, would pick up garbage. Tolerances: float32 1e-5; bf16/fp16 results are compared at
about one unit in the last place of the output dtype (both sides round a float result once).
"""

from __future__ import annotations

import pytest
import torch

from runtime.platform import AttentionMetadata, AttentionSpec
from runtime.platform.reference.attention import paged_attention
from runtime_cpu.attention import CpuAttentionBackend

TOLERANCE = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
}


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    # These tensors are tiny; on a shared 2-core machine OpenMP workers spinning against other
    # processes make each op 10-50x slower, while one thread runs the file in a few seconds.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# (tokens already in the cache, new tokens this step) per sequence.
CASES = {
    "prefill": [(0, 7), (0, 33), (0, 2)],
    "decode": [(12, 1), (0, 1), (40, 1), (31, 1), (5, 1)],
    # All decode rows of one context length: the backend drops the mask and the padding fill.
    "decode_one_length": [(20, 1), (20, 1), (20, 1)],
    "one_decode": [(37, 1)],
    "chunked_prefill": [(40, 9), (16, 16)],
    "speculative_verify": [(30, 4), (17, 4), (1, 4)],
    "mixed": [(0, 10), (20, 1), (33, 6), (0, 1), (64, 1), (5, 3), (9, 1)],
    "long": [(300, 1), (257, 11), (0, 150), (199, 1)],
}


def build_batch(seqs, *, num_heads, num_kv_heads, head_size, block_size, dtype, seed=0,
                shared_prefix_blocks=0, poison_unused=False):
    """Query/key/value, a paged cache holding each sequence's context, and the metadata.

    ``shared_prefix_blocks``: every sequence starts with the same physical blocks, as after a
    prefix-cache hit. ``poison_unused``: every slot no sequence's context owns holds NaN.
    """
    g = torch.Generator().manual_seed(seed)
    needed = [-(-(ctx + new) // block_size) for ctx, new in seqs]
    # Spare blocks that no sequence owns, so stray reads or writes have somewhere to land.
    num_blocks = sum(needed) + 4
    free = torch.randperm(num_blocks, generator=g).tolist()
    shared = [free.pop() for _ in range(shared_prefix_blocks)]
    tables = [shared + [free.pop() for _ in range(n - shared_prefix_blocks)] for n in needed]

    cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_size, generator=g).to(dtype)
    if poison_unused:
        owned = torch.zeros(num_blocks * block_size, dtype=torch.bool)
        for table, (ctx, _) in zip(tables, seqs):
            owned[[table[p // block_size] * block_size + p % block_size for p in range(ctx)]] = True
        cache.view(2, -1, num_kv_heads, head_size)[:, ~owned] = float("nan")

    slots = [table[p // block_size] * block_size + p % block_size
             for table, (ctx, new) in zip(tables, seqs) for p in range(ctx, ctx + new)]
    num_tokens = len(slots)
    # A spread of scores wide enough that soft-capping and masking change the result visibly.
    query = (2 * torch.randn(num_tokens, num_heads, head_size, generator=g)).to(dtype)
    key = torch.randn(num_tokens, num_kv_heads, head_size, generator=g).to(dtype)
    value = torch.randn(num_tokens, num_kv_heads, head_size, generator=g).to(dtype)

    starts = [0]
    for _, new in seqs:
        starts.append(starts[-1] + new)
    seq_lens = [ctx + new for ctx, new in seqs]
    width = max(needed) + 2
    block_table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    meta = AttentionMetadata(
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_table=block_table,
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        max_query_len=max(new for _, new in seqs),
        max_seq_len=max(seq_lens),
        query_start_loc_cpu=starts,
        seq_lens_cpu=seq_lens,
    )
    return query, key, value, cache, meta


def check(seqs, *, num_heads=4, num_kv_heads=2, head_size=64, block_size=16, dtype=torch.float32,
          sliding_window=None, logits_soft_cap=None, **batch_kwargs):
    """Run backend and reference on copies of one batch; compare outputs and the written cache."""
    query, key, value, cache, meta = build_batch(seqs, num_heads=num_heads, num_kv_heads=num_kv_heads,
                                                 head_size=head_size, block_size=block_size, dtype=dtype,
                                                 **batch_kwargs)
    spec = AttentionSpec(num_heads=num_heads, num_kv_heads=num_kv_heads, head_size=head_size,
                         scale=head_size ** -0.5, dtype=dtype, block_size=block_size,
                         sliding_window=sliding_window, logits_soft_cap=logits_soft_cap)
    assert CpuAttentionBackend.unsupported_reason(spec) is None
    ours_cache, ref_cache = cache.clone(), cache.clone()
    out = CpuAttentionBackend(spec).forward(query, key, value, ours_cache, meta)
    ref = paged_attention(query, key, value, ref_cache, meta, spec.scale, sliding_window, logits_soft_cap)
    assert out.dtype == dtype and out.shape == query.shape
    torch.testing.assert_close(out, ref, **TOLERANCE[dtype])

    before = cache.view(2, -1, num_kv_heads, head_size)
    after = ours_cache.view(2, -1, num_kv_heads, head_size)
    written = torch.zeros(before.shape[1], dtype=torch.bool)
    written[meta.slot_mapping] = True
    torch.testing.assert_close(after[:, ~written], before[:, ~written], rtol=0, atol=0, equal_nan=True)
    assert torch.equal(after[0, meta.slot_mapping], key)
    assert torch.equal(after[1, meta.slot_mapping], value)


@pytest.mark.parametrize("block_size", [1, 16, 32])
@pytest.mark.parametrize("case", sorted(CASES))
def test_phases_and_block_sizes(case, block_size):
    check(CASES[case], block_size=block_size)


def test_prefill_after_prefix_hit():
    # Three requests share the first three physical blocks (48 tokens) and each adds its own suffix.
    check([(48, 5), (48, 1), (50, 7)], block_size=16, shared_prefix_blocks=3)


@pytest.mark.parametrize("head_size", [64, 80, 128])
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(4, 4), (4, 2), (8, 2), (8, 1)], ids=["mha", "gqa2", "gqa4", "mqa"])
def test_head_layouts(num_heads, num_kv_heads, head_size):
    check(CASES["mixed"], num_heads=num_heads, num_kv_heads=num_kv_heads, head_size=head_size)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(("sliding_window", "logits_soft_cap"), [(None, None), (1, None), (5, None), (37, None),
                                                                 (None, 5.0), (None, 30.0), (7, 5.0)])
@pytest.mark.parametrize("case", ["mixed", "long"])
def test_window_soft_cap_dtypes(case, sliding_window, logits_soft_cap, dtype):
    check(CASES[case], num_heads=8, num_kv_heads=2, dtype=dtype, sliding_window=sliding_window,
          logits_soft_cap=logits_soft_cap)


@pytest.mark.parametrize("logits_soft_cap", [None, 5.0])
@pytest.mark.parametrize("block_size", [1, 16])
def test_unused_cache_slots_never_leak(block_size, logits_soft_cap):
    # Decode pads every context to the batch's longest; the padding must not read NaN into the result.
    check(CASES["mixed"], block_size=block_size, logits_soft_cap=logits_soft_cap, poison_unused=True)


@pytest.mark.parametrize("case", ["decode_one_length", "mixed"])
def test_padding_token_writes_nothing(case):
    """A negative slot (a padding token) stores nothing; the other tokens' K/V and every output
    still match the reference, which reads the same cache."""
    spec = AttentionSpec(num_heads=4, num_kv_heads=2, head_size=64, scale=0.125, dtype=torch.float32, block_size=16)
    query, key, value, cache, meta = build_batch(CASES[case], num_heads=4, num_kv_heads=2, head_size=64,
                                                 block_size=16, dtype=torch.float32)
    meta.slot_mapping[-1] = -1
    ours_cache, ref_cache = cache.clone(), cache.clone()
    out = CpuAttentionBackend(spec).forward(query, key, value, ours_cache, meta)
    ref = paged_attention(query, key, value, ref_cache, meta, spec.scale)
    torch.testing.assert_close(out, ref, **TOLERANCE[torch.float32])
    torch.testing.assert_close(ours_cache, ref_cache, rtol=0, atol=0)
    assert not torch.equal(ours_cache, cache)


def test_without_host_copies():
    # A caller that leaves the *_cpu lists empty still gets the right answer (on CPU it costs nothing).
    query, key, value, cache, meta = build_batch(CASES["mixed"], num_heads=4, num_kv_heads=2, head_size=64,
                                                 block_size=16, dtype=torch.float32)
    spec = AttentionSpec(4, 2, 64, 0.125, torch.float32, 16)
    ref = paged_attention(query, key, value, cache.clone(), meta, spec.scale)
    meta.query_start_loc_cpu, meta.seq_lens_cpu = [], []
    torch.testing.assert_close(CpuAttentionBackend(spec).forward(query, key, value, cache, meta), ref,
                               **TOLERANCE[torch.float32])


def test_declared_capabilities():
    spec = AttentionSpec(8, 2, 96, 0.1, torch.bfloat16, 7, sliding_window=64, logits_soft_cap=30.0)
    assert CpuAttentionBackend.unsupported_reason(spec) is None
    assert CpuAttentionBackend.unsupported_reason(AttentionSpec(8, 2, 96, 0.1, torch.float64, 16)) is not None
    assert CpuAttentionBackend.kv_cache_shape(10, 16, 2, 64) == (2, 10, 16, 2, 64)
    assert (CpuAttentionBackend.name, CpuAttentionBackend.platform) == ("cpu_sdpa", "cpu")
