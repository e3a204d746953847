"""Block pool and KV-cache manager: ref counting, LRU eviction, prefix caching."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.kv.block_pool import NULL_BLOCK_ID, BlockPool
from runtime.kv.manager import KVCacheManager
from runtime.sample.params import SamplingParams
from runtime.sched.request import Request

BS = 4


def make_request(request_id: str, prompt: list[int], lora_id: int = 0, **params) -> Request:
    return Request(request_id, list(prompt), SamplingParams(**params), lora_id=lora_id)


def admit(kv: KVCacheManager, request: Request) -> list[int] | None:
    """Take the request's prefix hits and blocks for the rest of it, as if computed at once."""
    hit_ids, num_hits = kv.get_computed_blocks(request)
    block_ids = kv.allocate_slots(request, request.num_tokens - num_hits, hit_ids, num_hits)
    if block_ids is not None:
        request.num_computed_tokens = request.num_tokens
    return block_ids


def check_blocks(kv: KVCacheManager, live: list[Request]) -> None:
    """No block leaked or shared wrongly; every live request's blocks cover its tokens, no more."""
    pool = kv.pool
    held: Counter[int] = Counter()
    for request in live:
        ids = kv.block_ids(request.request_id)
        assert len(ids) == len(set(ids))
        assert len(ids) == -(-request.num_computed_tokens // kv.block_size)
        held.update(ids)
    assert NULL_BLOCK_ID not in held and pool.blocks[NULL_BLOCK_ID].ref_cnt == 0
    for block in pool.blocks:
        assert block.ref_cnt == held[block.block_id] >= 0
        if block.block_hash is not None:
            assert pool.get_cached(block.block_hash) is block
    assert kv.num_free_blocks + len(held) + 1 == pool.num_blocks
    assert kv.usage == pytest.approx(len(held) / (pool.num_blocks - 1))


# -- block pool ---------------------------------------------------------------------------------


def test_pool_never_hands_out_the_null_block():
    pool = BlockPool(5)
    blocks = pool.allocate(4)
    assert sorted(b.block_id for b in blocks) == [1, 2, 3, 4]
    assert pool.num_free_blocks == 0 and pool.usage == 1.0
    with pytest.raises(ValueError):
        pool.allocate(1)


def test_pool_evicts_least_recently_freed_first_and_forgets_its_hash():
    pool = BlockPool(6)
    b1, b2, b3, b4, b5 = pool.allocate(5)
    pool.cache(b3, b"h3")
    pool.free([b3, b1])
    pool.free([b5, b2, b4])
    assert pool.get_cached(b"h3") is b3  # free but still cached
    first = pool.allocate(1)[0]
    assert first is b3 and first.block_hash is None and pool.get_cached(b"h3") is None
    assert [b.block_id for b in pool.allocate(4)] == [1, 5, 2, 4]


def test_pool_touch_revives_a_free_cached_block_and_double_free_raises():
    pool = BlockPool(4)
    (block,) = pool.allocate(1)
    pool.cache(block, b"h")
    pool.free([block])
    assert pool.num_free_blocks == 3
    pool.touch([block])
    assert block.ref_cnt == 1 and pool.num_free_blocks == 2
    pool.free([block])
    with pytest.raises(RuntimeError):
        pool.free([block])


def test_pool_keeps_the_first_cached_copy_of_duplicate_contents():
    pool = BlockPool(4)
    a, b = pool.allocate(2)
    pool.cache(a, b"h")
    pool.cache(b, b"h")
    assert pool.get_cached(b"h") is a and b.block_hash is None


# -- prefix caching -----------------------------------------------------------------------------


def test_prefix_hit_reuses_the_same_blocks_and_counts_tokens():
    kv = KVCacheManager(16, BS)
    a = make_request("a", range(10))
    ids_a = admit(kv, a)
    assert len(ids_a) == 3
    b = make_request("b", [*range(8), 99, 98, 97])
    hit_ids, num_hits = kv.get_computed_blocks(b)
    assert hit_ids == ids_a[:2] and num_hits == 8
    assert (kv.prefix_cache_queries, kv.prefix_cache_hits) == (10 + 11, 8)
    ids_b = kv.allocate_slots(b, b.num_tokens - num_hits, hit_ids, num_hits)
    assert ids_b[:2] == ids_a[:2] and ids_b[2] != ids_a[2]
    assert [kv.pool.blocks[i].ref_cnt for i in ids_a] == [2, 2, 1]
    b.num_computed_tokens = b.num_tokens
    check_blocks(kv, [a, b])


@pytest.mark.parametrize("prompt_len, expected_hit", [(8, 4), (9, 8), (3, 0)])
def test_full_hit_still_leaves_the_last_token_to_compute(prompt_len, expected_hit):
    kv = KVCacheManager(16, BS)
    admit(kv, make_request("a", range(prompt_len)))
    hit_ids, num_hits = kv.get_computed_blocks(make_request("b", range(prompt_len)))
    assert num_hits == expected_hit == len(hit_ids) * BS
    assert num_hits < prompt_len


def test_no_hits_when_caching_is_off_or_prompt_logprobs_are_wanted():
    for kv, params in ((KVCacheManager(16, BS, enable_prefix_caching=False), {}),
                       (KVCacheManager(16, BS), {"prompt_logprobs": 0})):
        admit(kv, make_request("a", range(12)))
        assert kv.get_computed_blocks(make_request("b", range(12), **params)) == ([], 0)


def test_lora_adapter_is_part_of_the_hash():
    kv = KVCacheManager(16, BS)
    admit(kv, make_request("a", range(12), lora_id=1))
    assert kv.get_computed_blocks(make_request("b", range(12), lora_id=2)) == ([], 0)
    assert kv.get_computed_blocks(make_request("c", range(12), lora_id=1))[1] == 8


def test_blocks_are_cached_only_once_full_and_hits_need_the_whole_prefix():
    kv = KVCacheManager(16, BS)
    a = make_request("a", range(6))
    admit(kv, a)
    assert kv.get_computed_blocks(make_request("b", range(9)))[1] == 4
    a.append_token(6)
    a.append_token(7)
    kv.allocate_slots(a, 2)  # decode-like growth fills block 1
    a.num_computed_tokens = 8
    assert kv.get_computed_blocks(make_request("c", range(9)))[1] == 8
    # Same second block, different first: the chain does not match.
    assert kv.get_computed_blocks(make_request("d", [9, 9, 9, 9, 4, 5, 6, 7, 8]))[1] == 0


def test_slots_past_the_known_tokens_are_cached_only_once_their_tokens_are_known():
    kv = KVCacheManager(16, BS)
    a = make_request("a", range(6))
    kv.allocate_slots(a, 10)  # 4 lookahead slots, as for speculative tokens
    a.num_computed_tokens = 6
    assert len(kv.block_ids("a")) == 3
    assert kv.get_computed_blocks(make_request("b", range(9)))[1] == 4
    for token in (6, 7, 8):
        a.append_token(token)
    kv.allocate_slots(a, 3)
    a.num_computed_tokens = 9
    assert kv.get_computed_blocks(make_request("c", range(9)))[1] == 8
    check_blocks(kv, [a])


def test_freed_tail_blocks_are_evicted_before_the_prefix():
    kv = KVCacheManager(6, BS)  # 5 usable blocks
    a = make_request("a", range(13))
    admit(kv, a)  # 4 blocks, 3 of them full and cached
    kv.free(a)
    kv.free(a)  # idempotent
    check_blocks(kv, [])
    filler = make_request("f", [100] * 8)
    admit(kv, filler)  # takes the never-used block, then a's last (partial) block
    assert kv.get_computed_blocks(make_request("b", range(13)))[1] == 12
    filler.append_token(100)
    kv.allocate_slots(filler, 1)  # evicts a's third block, the tail of its cached chain
    filler.num_computed_tokens = 9
    assert kv.get_computed_blocks(make_request("c", range(13)))[1] == 8
    check_blocks(kv, [filler])


def test_failed_allocation_changes_nothing_and_free_hits_count_against_supply():
    kv = KVCacheManager(6, BS)  # 5 usable blocks
    a = make_request("a", range(9))
    admit(kv, a)
    kv.free(a)  # all 5 blocks free, a's first two still cached
    big = make_request("big", range(24))  # 6 blocks: 2 hits + 4 new, but only 3 are free besides the hits
    hit_ids, num_hits = kv.get_computed_blocks(big)
    assert num_hits == 8
    before = [(blk.ref_cnt, blk.block_hash) for blk in kv.pool.blocks]
    assert kv.allocate_slots(big, 16, hit_ids, num_hits) is None
    assert [(blk.ref_cnt, blk.block_hash) for blk in kv.pool.blocks] == before
    assert kv.num_free_blocks == 5 and kv.block_ids("big") == []
    fits = make_request("fits", range(20))  # 2 hits + 3 new
    assert admit(kv, fits) is not None
    check_blocks(kv, [fits])


def test_free_before_commit_forgets_blocks_whose_kv_was_never_written():
    kv = KVCacheManager(16, BS)
    a = make_request("a", range(12))
    kv.allocate_slots(a, 12)  # scheduled, then aborted before the step's results came back
    kv.free(a)
    assert kv.get_computed_blocks(make_request("b", range(12))) == ([], 0)


def test_reset_prefix_cache_keeps_held_blocks():
    kv = KVCacheManager(16, BS)
    a = make_request("a", range(12))
    admit(kv, a)
    kv.reset_prefix_cache()
    assert kv.get_computed_blocks(make_request("b", range(12))) == ([], 0)
    check_blocks(kv, [a])


# -- random operation sequences -----------------------------------------------------------------

PREFIXES = [[], [1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 9, 9], [5] * 11]


@st.composite
def prompts(draw):
    prefix = draw(st.sampled_from(PREFIXES))
    return prefix + draw(st.lists(st.integers(0, 3), min_size=1, max_size=6))


@settings(deadline=None, max_examples=150)
@given(
    num_blocks=st.integers(3, 12),
    caching=st.booleans(),
    ops=st.lists(st.tuples(st.sampled_from(["admit", "grow", "free"]), st.integers(0, 5),
                           prompts(), st.integers(1, 20), st.integers(0, 1)), max_size=40),
)
def test_random_operations_keep_blocks_consistent(num_blocks, caching, ops):
    """Every hit block holds exactly the KV the request needs (tracked per slot), nothing leaks."""
    kv = KVCacheManager(num_blocks, BS, enable_prefix_caching=caching)
    live: dict[int, Request] = {}
    slots: dict[tuple[int, int], tuple] = {}  # (block, offset) -> (lora, tokens up to that one)
    counter = 0

    def compute(request: Request, start: int) -> None:
        """Write KV for tokens start.. as the forward pass would, after checking what it reads."""
        ids = kv.block_ids(request.request_id)
        tokens = request.all_token_ids
        for pos in range(request.num_computed_tokens):
            key = (ids[pos // BS], pos % BS)
            if pos >= start:
                slots[key] = (request.lora_id, tuple(tokens[: pos + 1]))
            assert slots[key] == (request.lora_id, tuple(tokens[: pos + 1]))

    for op, slot, prompt, n, lora in ops:
        if op == "admit" and slot not in live:
            counter += 1
            request = make_request(f"r{counter}", prompt, lora_id=lora)
            hit_ids, num_hits = kv.get_computed_blocks(request)
            num_new = min(n, request.num_tokens - num_hits)
            if kv.allocate_slots(request, num_new, hit_ids, num_hits) is not None:
                request.num_computed_tokens = num_hits + num_new
                live[slot] = request
                compute(request, num_hits)
        elif op == "grow" and slot in live:
            request = live[slot]
            if request.num_computed_tokens == request.num_tokens:
                request.append_token(n % 4)
            start = request.num_computed_tokens
            num_new = min(n, request.num_tokens - start)
            if kv.allocate_slots(request, num_new) is not None:
                request.num_computed_tokens += num_new
                compute(request, start)
        elif op == "free" and slot in live:
            kv.free(live.pop(slot))
        check_blocks(kv, list(live.values()))

    for request in live.values():
        kv.free(request)
    check_blocks(kv, [])
    assert kv.num_free_blocks == num_blocks - 1
