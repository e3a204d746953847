"""The KV cache's host tier: offloaded prefix blocks, preemption by swap, and the scheduler with both.

A simulated runner applies each step's block copies and tracks which tokens' KV every device and
host slot holds, so a block loaded from the wrong place, or overwritten before it was copied,
fails the step that reads it.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from runtime.engine.args import EngineArgs
from runtime.kv.host_pool import HostBlockPool
from runtime.kv.manager import KVCacheManager
from runtime.sample.params import SamplingParams
from runtime.sched.request import Request, RequestStatus
from runtime.sched.scheduler import Scheduler, SchedulerOutput, swap_is_cheaper

from test_kv_manager import BS, admit, make_request

EOS = 0


def next_token(tokens: tuple[int, ...]) -> int:
    """The simulated model: a token that depends on every one before it."""
    return sum(i * t for i, t in enumerate(tokens, 1)) * 2654435761 % 1009 % 10


class SimulatedRunner:
    """Applies steps as the runner does: the step's copies (to the host first), then its forward
    pass, which writes each new token's KV and checks all KV each request attends to."""

    def __init__(self) -> None:
        self.device: dict[tuple[int, int], tuple] = {}
        self.host: dict[tuple[int, int], tuple] = {}

    def copy(self, out: SchedulerOutput) -> None:
        for device_block, host_block in out.transfers.to_host:
            for offset in range(BS):
                self.host[(host_block, offset)] = self.device.get((device_block, offset))
        for device_block, host_block in out.transfers.to_device:
            for offset in range(BS):
                self.device[(device_block, offset)] = self.host.get((host_block, offset))

    def forward(self, out: SchedulerOutput) -> dict[str, list[int]]:
        self.copy(out)
        for s in out.scheduled:
            tokens = s.request.all_token_ids
            for pos in range(s.start, s.start + s.num_new_tokens):
                self.device[(s.block_ids[pos // BS], pos % BS)] = tuple(tokens[: pos + 1])
        sampled = {}
        for s in out.scheduled:
            if s.request.status is not RequestStatus.RUNNING:
                continue
            tokens = s.request.all_token_ids
            for pos in range(s.start + s.num_new_tokens):
                assert self.device.get((s.block_ids[pos // BS], pos % BS)) == tuple(tokens[: pos + 1]), \
                    f"{s.request.request_id} reads wrong KV at position {pos}"
            if s.sample:
                sampled[s.request.request_id] = [next_token(tuple(tokens))]
        return sampled


# -- the KV manager's host tier -------------------------------------------------------------------


def test_an_evicted_prefix_goes_to_the_host_and_a_later_hit_loads_it_back():
    kv = KVCacheManager(4, BS, num_host_blocks=4)  # 3 usable device blocks
    a = make_request("a", range(9))
    a_ids = admit(kv, a)
    kv.free(a)
    assert not kv.take_transfers()
    b = make_request("b", range(100, 112))
    b_ids = admit(kv, b)  # takes every block: a's two cached ones are copied out first
    out = kv.take_transfers()
    assert sorted(d for d, _ in out.to_host) == sorted(a_ids[:2]) and not out.to_device
    host_of = {d: h for d, h in out.to_host}
    kv.free(b)
    c = make_request("c", list(range(9)) + [7])
    hit_ids, num_hits = kv.get_computed_blocks(c)
    assert (hit_ids, num_hits) == ([], 8)  # none on the device, two blocks on the host
    c_ids = kv.allocate_slots(c, c.num_tokens - num_hits, hit_ids, num_hits)
    loads = kv.take_transfers()
    assert loads.to_device == [(c_ids[0], host_of[a_ids[0]]), (c_ids[1], host_of[a_ids[1]])]
    # b's three full blocks were evicted to make room: copied out (the last over the least recently
    # stored copy, a's being locked) before the loads overwrite them.
    assert sorted(d for d, _ in loads.to_host) == sorted(b_ids)
    assert {h for _, h in loads.to_host} == set(range(4)) - set(host_of.values())
    assert (kv.cpu_prefix_cache_queries, kv.cpu_prefix_cache_hits) == (9 + 12 + 10, 8)
    assert (kv.prefix_cache_queries, kv.prefix_cache_hits) == (9 + 12 + 10, 0)


def test_a_host_copy_being_loaded_is_not_overwritten_by_an_offload_of_the_same_step():
    kv = KVCacheManager(3, BS, num_host_blocks=1)  # 2 usable device blocks, 1 host block
    a = make_request("a", range(5))
    admit(kv, a)
    kv.free(a)
    admit(kv, b := make_request("b", range(50, 58)))  # evicts a's one cached block to the host
    kv.free(b)
    kv.take_transfers()
    c = make_request("c", list(range(4)) + [9, 9, 9])
    hit_ids, num_hits = kv.get_computed_blocks(c)
    assert num_hits == 4
    kv.allocate_slots(c, c.num_tokens - num_hits, hit_ids, num_hits)  # evicts b's blocks: no host room
    out = kv.take_transfers()
    assert out.to_host == [] and out.to_device == [(kv.block_ids("c")[0], 0)]


def test_swap_out_keeps_the_computed_blocks_on_the_host_until_swap_in():
    kv = KVCacheManager(6, BS, num_host_blocks=4)
    a = make_request("a", range(10))
    ids = admit(kv, a)
    assert kv.swap_out(a)
    out = kv.take_transfers()
    assert [d for d, _ in out.to_host] == ids and kv.block_ids("a") == [] and kv.num_free_blocks == 5
    assert kv.is_swapped(a) and a.num_computed_tokens == 10 and kv.host.num_held == 3
    held = [h for _, h in out.to_host]
    a.append_token(3)
    new_ids = kv.swap_in(a, 1)
    back = kv.take_transfers()
    assert back.to_device == list(zip(new_ids, held)) and len(new_ids) == 3
    assert not kv.is_swapped(a) and kv.host.num_held == 0


def test_swap_out_refuses_without_room_and_an_aborted_swapped_request_returns_its_host_blocks():
    kv = KVCacheManager(8, BS, num_host_blocks=3)
    a, b = make_request("a", range(10)), make_request("b", range(20, 30))
    admit(kv, a), admit(kv, b)
    assert kv.swap_out(a)
    assert not kv.swap_out(b) and kv.block_ids("b")  # 3 blocks needed, none left: b keeps its blocks
    kv.free(a)  # aborted while swapped
    assert kv.host.num_held == 0 and kv.host.num_evictable == 3
    assert kv.swap_out(b)


def test_host_pool_hands_out_each_block_once():
    pool = HostBlockPool(3)
    first = pool.store(b"x")
    assert pool.store(b"x") is None  # already there
    held = pool.hold(2)
    assert sorted([first, *held]) == [0, 1, 2]
    assert pool.lock(b"x") == first and pool.hold(1) is None  # locked: not evictable
    pool.end_step()
    assert pool.hold(1) == [first] and pool.lookup(b"x") is None


def test_auto_preemption_mode_swaps_for_big_models_and_recomputes_tiny_ones():
    h100 = dict(host_bytes_per_s=2.5e10, flops_per_s=4e14)
    # Llama-3-8B in bf16: 128 KiB of KV and 16 GFLOPs per token.
    assert swap_is_cheaper(131072, 16e9, **h100)
    # A 135M-parameter model with the same KV shape per layer for 30 layers.
    assert not swap_is_cheaper(30 * 4096, 2 * 135e6, **h100)


@pytest.mark.parametrize("kwargs, message", [
    (dict(kv_offloading_size=-1), "kv_offloading_size must be >= 0 GiB"),
    (dict(preemption_mode="swap"), "set kv_offloading_size"),
    (dict(preemption_mode="sometimes", kv_offloading_size=1), "preemption_mode must be one of"),
])
def test_bad_settings_are_refused_naming_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EngineArgs(**kwargs)


# -- the scheduler with a host tier: random operation sequences ------------------------------------


def run(ops, num_blocks, num_host_blocks, budget, max_num_seqs, mode, caching, look_ahead):
    """Replay ``ops`` on a scheduler; every request's output, and how many preemptions swapped."""
    kv = KVCacheManager(num_blocks, BS, enable_prefix_caching=caching, num_host_blocks=num_host_blocks)
    sched = Scheduler(kv, max_num_seqs, budget, preemption_mode=mode)
    runner = SimulatedRunner()
    requests: list[Request] = []
    in_flight: SchedulerOutput | None = None

    def step() -> None:
        nonlocal in_flight
        out, in_flight = in_flight, None
        if out is None:
            out = sched.schedule()
        following = sched.look_ahead(out) if look_ahead else None
        sched.update(out, runner.forward(out))
        if following is not None:
            in_flight = following
        check(sched, requests, in_flight)

    for op, arg in ops:
        if op == "add":
            prompt, max_tokens, eos = arg
            request = Request(f"r{len(requests)}", prompt, SamplingParams(max_tokens=max_tokens),
                              eos_token_ids=frozenset({EOS} if eos else ()), max_model_len=(num_blocks - 1) * BS,
                              arrival_time=float(len(requests)))
            requests.append(request)
            sched.add_request(request)
        elif op == "step":
            step()
        elif requests:
            sched.abort_requests([requests[arg % len(requests)].request_id])
            check(sched, requests, in_flight)
    for _ in range(3000):
        if not sched.has_unfinished_requests() and in_flight is None:
            break
        step()
    if in_flight is not None:
        runner.copy(in_flight)
    assert not sched.has_unfinished_requests() and in_flight is None
    assert kv.num_free_blocks == num_blocks - 1
    if kv.host is not None:
        kv.take_transfers()
        assert kv.host.num_held == 0 and kv.host.num_evictable == num_host_blocks
    return {r.request_id: (r.status, r.output_token_ids) for r in requests}, sched.num_swaps


def check(sched: Scheduler, requests: list[Request], in_flight: SchedulerOutput | None) -> None:
    """Reference counts match the holders; device and host blocks are each in exactly one place."""
    kv = sched.kv
    held: Counter[int] = Counter()
    ahead = {s.request.request_id: s.start + s.num_new_tokens for s in in_flight.scheduled} if in_flight else {}
    swapped_blocks = 0
    for request in requests:
        ids = kv.block_ids(request.request_id)
        if request.status is RequestStatus.RUNNING:
            assert len(ids) == -(-ahead.get(request.request_id, request.num_computed_tokens) // BS)
            held.update(ids)
        else:
            assert ids == []
        if kv.is_swapped(request):
            assert request.status is RequestStatus.PREEMPTED and request.num_computed_tokens > 0
            swapped_blocks += -(-request.num_computed_tokens // BS)
        elif request.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED):
            assert request.num_computed_tokens == 0
    for block in kv.pool.blocks:
        assert block.ref_cnt == held[block.block_id]
    assert kv.num_free_blocks + len(held) + 1 == kv.pool.num_blocks
    if kv.host is not None:
        host = kv.host
        assert host.num_held == swapped_blocks
        places = host._free + list(host._cached.values()) + host._releasing
        assert len(places) == len(set(places)) == host.num_blocks - swapped_blocks


@st.composite
def requests_to_add(draw):
    prefix = draw(st.sampled_from([[], [1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 9, 9, 9], [5] * 10]))
    prompt = prefix + draw(st.lists(st.integers(1, 4), min_size=1, max_size=6))
    return prompt, draw(st.integers(1, 10)), draw(st.booleans())


OPS = st.lists(st.one_of(st.tuples(st.just("add"), requests_to_add()), st.tuples(st.just("step"), st.none()),
                         st.tuples(st.just("step"), st.none()), st.tuples(st.just("abort"), st.integers(0, 30))),
               min_size=10, max_size=50)


@settings(deadline=None, max_examples=100)
# A look-ahead step that swaps requests out and schedules none: its copies must still be made.
@example(num_blocks=8, num_host_blocks=8, budget=12, max_num_seqs=2, mode="swap", caching=True, look_ahead=True,
         ops=[("step", None), ("add", ([1, 2, 3, 4, 5, 6, 7, 8, 4, 2, 4, 2, 2, 1], 10, False)),
              ("add", ([5] * 10 + [3, 4], 2, False)), ("step", None), ("step", None),
              ("add", ([1, 2, 3, 4, 9, 9, 9, 4, 1, 2, 4], 8, True)), ("step", None), ("abort", 21), ("step", None),
              ("step", None)])
@given(num_blocks=st.integers(6, 10), num_host_blocks=st.integers(1, 12), budget=st.integers(1, 16),
       max_num_seqs=st.integers(1, 4), mode=st.sampled_from(["swap", "recompute"]), caching=st.booleans(),
       look_ahead=st.booleans(), ops=OPS)
def test_offload_and_swap_keep_blocks_consistent_and_outputs_unchanged(num_blocks, num_host_blocks, budget,
                                                                        max_num_seqs, mode, caching, look_ahead, ops):
    """With a host tier (and swap), every step reads the KV it needs, no block leaks, and every
    request that was not aborted ends with the tokens it gets without a host tier."""
    with_tier, _ = run(ops, num_blocks, num_host_blocks, budget, max_num_seqs, mode, caching, look_ahead)
    without, _ = run(ops, num_blocks, 0, budget, max_num_seqs, "recompute", caching, look_ahead)
    for rid, (status, tokens) in with_tier.items():
        if status is not RequestStatus.FINISHED_ABORTED and without[rid][0] is not RequestStatus.FINISHED_ABORTED:
            assert (status, tokens) == without[rid], rid


def test_swap_happens_under_pressure_and_resumes_where_it_stopped():
    rng = random.Random(0)
    ops = [("add", ([rng.randrange(1, 9) for _ in range(11)], 12, False)) for _ in range(4)]
    outputs, swaps = run(ops, 8, 16, 16, 4, "swap", True, False)
    reference, _ = run(ops, 64, 0, 16, 4, "recompute", True, False)
    assert swaps > 0 and outputs == reference
