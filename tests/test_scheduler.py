"""Scheduler: one token budget, chunked prefill, preemption, policies, aborts."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.kv.block_pool import NULL_BLOCK_ID
from runtime.kv.manager import KVCacheManager
from runtime.sample.params import SamplingParams
from runtime.sched.request import Request, RequestStatus
from runtime.sched.scheduler import ScheduledRequest, Scheduler, SchedulerOutput

BS = 4
EOS = 0


def make_request(request_id: str, prompt, max_tokens: int = 4, priority: int = 0, arrival: float = 0.0,
                 max_model_len: int = 2048, **params) -> Request:
    return Request(request_id, list(prompt), SamplingParams(max_tokens=max_tokens, **params),
                   priority=priority, arrival_time=arrival, max_model_len=max_model_len)


def make_scheduler(num_blocks=64, max_num_seqs=8, max_num_batched_tokens=32, policy="fcfs", caching=True,
                   max_loras=None):
    kv = KVCacheManager(num_blocks, BS, enable_prefix_caching=caching)
    return Scheduler(kv, max_num_seqs, max_num_batched_tokens, policy, max_loras=max_loras)


def step(sched: Scheduler, token: int = 7) -> SchedulerOutput:
    out = sched.schedule()
    sched.update(out, {s.request.request_id: [token] for s in out.scheduled if s.sample})
    return out


def run_to_completion(sched: Scheduler, max_steps: int = 1000) -> list[SchedulerOutput]:
    outputs = []
    while sched.has_unfinished_requests():
        assert len(outputs) < max_steps, "no progress"
        outputs.append(step(sched))
    return outputs


def plan(out: SchedulerOutput) -> list[tuple[str, int, int]]:
    return [(s.request.request_id, s.start, s.num_new_tokens) for s in out.scheduled]


# -- direct behaviour ---------------------------------------------------------------------------


def test_prefill_then_decode_then_finish_frees_everything():
    sched = make_scheduler()
    req = make_request("a", range(1, 10), max_tokens=3)
    sched.add_request(req)
    assert plan(step(sched)) == [("a", 0, 9)]
    assert plan(step(sched)) == [("a", 9, 1)]
    out = step(sched)
    assert req.status is RequestStatus.FINISHED_LENGTH and len(req.output_token_ids) == 3
    assert sched.get_request("a") is None and not sched.has_unfinished_requests()
    assert sched.kv.num_free_blocks == 63 and sched.kv.block_ids("a") == []
    assert out.finished_ids == [] and sched.schedule().finished_ids == ["a"]


def test_eos_finishes_with_stop_status():
    sched = make_scheduler()
    req = Request("a", [1, 2, 3], SamplingParams(max_tokens=10), eos_token_ids=frozenset({EOS}))
    sched.add_request(req)
    step(sched, token=EOS)
    assert req.status is RequestStatus.FINISHED_STOPPED and sched.kv.num_free_blocks == 63


def test_chunked_prefill_never_stalls_a_running_decode():
    sched = make_scheduler(max_num_batched_tokens=8)
    decoding = make_request("d", [1, 2, 3], max_tokens=20)
    sched.add_request(decoding)
    step(sched)
    long = make_request("long", range(100, 130), max_tokens=2)
    sched.add_request(long)
    chunks = []
    while long.num_computed_tokens < long.num_prompt_tokens:
        out = step(sched)
        assert plan(out)[0] == ("d", decoding.num_tokens - 2, 1)  # the decode runs every step
        assert out.num_batched_tokens <= 8
        chunks.append(plan(out)[1][2])
    assert chunks == [7, 7, 7, 7, 2] and len(long.output_token_ids) == 1


def test_prefix_hit_starts_after_the_cached_blocks():
    sched = make_scheduler()
    first = make_request("a", range(1, 11), max_tokens=1)
    sched.add_request(first)
    run_to_completion(sched)
    second = make_request("b", range(1, 11), max_tokens=1)
    sched.add_request(second)
    assert plan(sched.schedule()) == [("b", 8, 2)]
    assert sched.kv.prefix_cache_hits == 8


def test_full_prefix_hit_recomputes_at_least_one_token():
    sched = make_scheduler()
    sched.add_request(make_request("a", range(1, 9), max_tokens=1))
    run_to_completion(sched)
    again = make_request("b", range(1, 9), max_tokens=1)
    sched.add_request(again)
    out = sched.schedule()
    assert plan(out) == [("b", 4, 4)] and out.scheduled[0].sample


def test_preemption_on_a_tiny_cache_then_both_complete():
    # 6 usable blocks of 4 = 24 slots; each request needs 4 + 12 = 16 tokens (4 blocks) at the end.
    sched = make_scheduler(num_blocks=7, max_num_batched_tokens=16, caching=False)
    first = make_request("a", [1, 2, 3, 4], max_tokens=12, arrival=0.0)
    second = make_request("b", [5, 6, 7, 8], max_tokens=12, arrival=1.0)
    sched.add_request(first)
    sched.add_request(second)
    outputs = run_to_completion(sched)
    preempted = [rid for out in outputs for rid in out.preempted_ids]
    assert preempted and set(preempted) == {"b"}  # fcfs: the latest arrival is the victim
    assert sched.num_preemptions == second.num_preemptions == len(preempted)
    assert len(first.output_token_ids) == len(second.output_token_ids) == 12
    assert first.status is second.status is RequestStatus.FINISHED_LENGTH
    resumed = next(s for out in outputs[1:] for s in out.scheduled if s.request is second and s.start == 0)
    assert resumed.num_new_tokens > second.num_prompt_tokens  # recomputes its earlier output too
    assert sched.kv.num_free_blocks == 6


def test_priority_policy_preempts_the_largest_priority_value():
    sched = make_scheduler(num_blocks=7, max_num_batched_tokens=16, policy="priority")
    casual = make_request("casual", [5, 6, 7, 8], max_tokens=12, priority=1, arrival=0.0)
    urgent = make_request("urgent", [1, 2, 3, 4], max_tokens=12, priority=0, arrival=1.0)
    sched.add_request(casual)
    outputs = [step(sched)]  # casual is admitted first, yet it is the victim
    sched.add_request(urgent)
    outputs += run_to_completion(sched)
    assert {rid for out in outputs for rid in out.preempted_ids} == {"casual"}
    assert len(casual.output_token_ids) == len(urgent.output_token_ids) == 12


def test_preempting_a_request_scheduled_earlier_in_the_step_returns_its_budget():
    sched = make_scheduler(num_blocks=5, max_num_seqs=4, max_num_batched_tokens=3, policy="priority")
    sched.add_request(make_request("low", [35], max_tokens=7, priority=2, arrival=0.0))
    assert plan(step(sched)) == [("low", 0, 1)]
    sched.add_request(make_request("a", [34, 44], max_tokens=6, priority=1, arrival=1.0))
    assert plan(step(sched)) == [("low", 1, 1), ("a", 0, 2)]
    sched.add_request(make_request("b", [13, 22, 1, 11], max_tokens=8, priority=1, arrival=2.0))
    assert plan(step(sched)) == [("low", 2, 1), ("a", 2, 1), ("b", 0, 1)]
    assert plan(step(sched)) == [("low", 3, 1), ("a", 3, 1), ("b", 1, 1)]
    # low takes the last free block, then a needs one: low (scheduled first) is preempted,
    # and the token it gave back goes to b.
    out = step(sched)
    assert out.preempted_ids == ["low"] and plan(out) == [("a", 4, 1), ("b", 2, 2)]


@pytest.mark.parametrize("policy, expected", [("fcfs", ["low", "high", "mid"]), ("priority", ["high", "mid", "low"])])
def test_admission_order_follows_the_policy(policy, expected):
    sched = make_scheduler(max_num_seqs=1, policy=policy)
    sched.add_request(make_request("low", [1, 2], max_tokens=1, priority=5, arrival=0.0))
    sched.add_request(make_request("high", [1, 2], max_tokens=1, priority=0, arrival=1.0))
    sched.add_request(make_request("mid", [1, 2], max_tokens=1, priority=2, arrival=2.0))
    order = [s.request.request_id for out in run_to_completion(sched) for s in out.scheduled]
    assert order == expected


def test_fcfs_does_not_skip_a_waiting_request_that_does_not_fit():
    sched = make_scheduler(num_blocks=6, max_num_batched_tokens=64)  # 5 usable blocks
    sched.add_request(make_request("a", range(1, 13), max_tokens=4))  # 3 blocks
    sched.add_request(make_request("big", range(100, 119), max_tokens=1, arrival=1.0))  # needs 5
    sched.add_request(make_request("small", [1], max_tokens=1, arrival=2.0))
    assert [s.request.request_id for s in sched.schedule().scheduled] == ["a"]
    assert sched.num_waiting == 2


def test_max_num_seqs_and_budget_limit_admission():
    sched = make_scheduler(max_num_seqs=2, max_num_batched_tokens=10)
    for i in range(4):
        sched.add_request(make_request(f"r{i}", range(1, 5), max_tokens=2, arrival=float(i)))
    out = sched.schedule()
    assert plan(out) == [("r0", 0, 4), ("r1", 0, 4)]
    assert sched.num_running == 2 and sched.num_waiting == 2


def test_abort_frees_blocks_at_once_and_is_reported_once():
    sched = make_scheduler()
    running, waiting = make_request("run", range(1, 10)), make_request("wait", range(1, 10))
    sched.add_request(running)
    step(sched)
    sched.add_request(waiting)
    sched.abort_requests(["run", "wait", "unknown"])
    assert running.status is waiting.status is RequestStatus.FINISHED_ABORTED
    assert sched.kv.num_free_blocks == 63 and not sched.has_unfinished_requests()
    assert sched.schedule().finished_ids == ["run", "wait"]
    assert sched.schedule().finished_ids == []


def test_aborting_many_queued_requests_keeps_the_others_in_arrival_order():
    sched = make_scheduler(num_blocks=256, max_num_seqs=64, max_num_batched_tokens=512)
    requests = [make_request(f"r{i}", range(1, 5), max_tokens=1, arrival=float(i)) for i in range(60)]
    for request in reversed(requests):  # the queue orders them by arrival, not by when they were added
        sched.add_request(request)
    aborted = [f"r{i}" for i in range(60) if i % 3 != 1]
    sched.abort_requests(aborted + aborted[:5] + ["unknown"])  # repeated and unknown ids are ignored
    assert all(sched.get_request(r) is None for r in aborted)
    assert [r.status for r in requests if r.request_id in aborted] == [RequestStatus.FINISHED_ABORTED] * 40
    out = sched.schedule()
    assert [s.request.request_id for s in out.scheduled] == [f"r{i}" for i in range(1, 60, 3)]
    assert out.finished_ids == aborted
    run_to_completion(sched)
    assert sched.kv.num_free_blocks == 255


def test_update_skips_requests_aborted_after_schedule():
    sched = make_scheduler()
    req = make_request("a", range(1, 10))
    sched.add_request(req)
    out = sched.schedule()
    sched.abort_requests(["a"])
    assert sched.update(out, {"a": [5]}) == []
    assert req.output_token_ids == [] and sched.kv.num_free_blocks == 63
    # Its step was never committed, so the cache does not vouch for the KV it would have written.
    sched.add_request(make_request("b", range(1, 10)))
    assert plan(sched.schedule()) == [("b", 0, 9)]


def test_finish_requests_for_stop_strings():
    sched = make_scheduler()
    req = make_request("a", range(1, 5), max_tokens=10)
    sched.add_request(req)
    step(sched)
    sched.finish_requests(["a"], RequestStatus.FINISHED_STOPPED)
    assert req.status is RequestStatus.FINISHED_STOPPED and sched.kv.num_free_blocks == 63
    with pytest.raises(ValueError):
        sched.finish_requests(["a"], RequestStatus.RUNNING)


def test_a_step_holds_at_most_max_loras_adapters_and_the_others_keep_their_place():
    sched = make_scheduler(max_loras=2)
    for i, lora_id in enumerate([1, 2, 3, 0, 1]):
        sched.add_request(Request(f"r{i}", [i + 1] * 4, SamplingParams(max_tokens=2), lora_id=lora_id))
    first = sched.schedule()
    # r2's adapter waits; the rows come grouped by adapter (see the test below).
    assert [s.request.request_id for s in first.scheduled] == ["r3", "r0", "r4", "r1"]
    sched.update(first, {s.request.request_id: [7] for s in first.scheduled})
    second = sched.schedule()
    assert "r2" not in [s.request.request_id for s in second.scheduled]  # adapters 1 and 2 still run
    sched.update(second, {s.request.request_id: [7] for s in second.scheduled})
    third = sched.schedule()  # r0, r1 and r4 finished (2 tokens): adapter 3's turn
    assert [s.request.request_id for s in third.scheduled] == ["r2"]


def test_rows_of_one_adapter_are_side_by_side_in_admission_order():
    """With several adapters in a step its rows come grouped by adapter (the LoRA kernels then
    multiply most token tiles once), each group in the order the requests were served, decode rows
    and a new prompt alike; with one adapter (and the base model) the order is the scheduler's."""
    sched = make_scheduler(num_blocks=256, max_num_seqs=16, max_num_batched_tokens=256)
    lora_of = {f"r{i}": lora_id for i, lora_id in enumerate([3, 1, 0, 2, 1, 3, 0, 2, 1])}
    for i, (rid, lora_id) in enumerate(lora_of.items()):
        sched.add_request(Request(rid, [i + 1] * 4, SamplingParams(max_tokens=4), lora_id=lora_id))
    first = step(sched)
    sched.add_request(Request("late", [5] * 4, SamplingParams(max_tokens=4), lora_id=2))
    lora_of["late"] = 2
    second = step(sched)
    for out in (first, second):
        ids = [s.request.request_id for s in out.scheduled]
        served = [rid for rid in lora_of if rid in ids]  # admission order
        assert ids == sorted(served, key=lora_of.get)  # grouped by adapter, stable within a group
    assert [s.request.request_id for s in second.scheduled if s.request.lora_id == 2] == ["r3", "r7", "late"]

    single = make_scheduler()
    for i, lora_id in enumerate([1, 0, 1, 0]):
        single.add_request(Request(f"s{i}", [i + 1] * 4, SamplingParams(max_tokens=2), lora_id=lora_id))
    assert [s.request.request_id for s in single.schedule().scheduled] == ["s0", "s1", "s2", "s3"]


def test_duplicate_request_id_is_refused():
    sched = make_scheduler()
    sched.add_request(make_request("a", [1]))
    with pytest.raises(ValueError):
        sched.add_request(make_request("a", [2]))


def test_sample_flag_is_fixed_at_schedule_time():
    req = make_request("a", [1, 2, 3])
    item = ScheduledRequest(req, 0, 3, [1])
    req.append_token(9)
    assert item.sample


# -- random operation sequences -----------------------------------------------------------------

PREFIXES = [[], [1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 9, 9, 9], [5] * 10]


@st.composite
def new_requests(draw):
    prompt = draw(st.sampled_from(PREFIXES)) + draw(st.lists(st.integers(0, 4), min_size=1, max_size=6))
    return prompt, draw(st.integers(1, 12)), draw(st.integers(0, 3)), draw(st.booleans()), draw(st.integers(0, 3))


MAX_LORAS = 2
"""Requests use adapters 0 (none) to 3; a step may hold 2."""
STEP = st.tuples(st.just("step"), st.none())
# Steps weigh more, and adds come in bursts, so requests overlap and fight over blocks.
OPS = st.one_of(
    st.tuples(st.just("add"), st.lists(new_requests(), min_size=1, max_size=3)),
    STEP,
    STEP,
    STEP,
    st.tuples(st.just("abort"), st.integers(0, 30)),
    st.tuples(st.just("abort_mid_step"), st.integers(0, 30)),
    st.tuples(st.just("stop_string"), st.integers(0, 30)),
)


class Checker:
    """Replays each step as the runner would, tracking what KV every cache slot holds."""

    def __init__(self, sched: Scheduler) -> None:
        self.sched = sched
        self.requests: list[Request] = []
        self.slots: dict[tuple[int, int], tuple] = {}  # (block, offset) -> tokens up to that one

    def check_schedule(self, out: SchedulerOutput) -> None:
        sched = self.sched
        assert out.num_batched_tokens <= sched.max_num_batched_tokens
        assert len(out.scheduled) <= sched.max_num_seqs
        assert len({s.request.request_id for s in out.scheduled}) == len(out.scheduled)
        assert len({s.request.lora_id for s in out.scheduled} - {0}) <= MAX_LORAS
        for s in out.scheduled:
            assert s.num_new_tokens >= 1 and s.start == s.request.num_computed_tokens
            assert s.start + s.num_new_tokens <= s.request.num_tokens + s.request.num_pending_tokens
            # A token still being sampled is computed alone, and only if it does not end the request.
            assert not s.token_pending or (s.num_new_tokens == 1 and s.start + 1 < s.request.max_total_tokens)
            assert len(s.block_ids) == -(-(s.start + s.num_new_tokens) // BS)
            assert s.block_ids == sched.kv.block_ids(s.request.request_id)
        still_running = [r for r in self.requests if r.status is RequestStatus.RUNNING]
        for rid in out.preempted_ids:
            victim = sched.get_request(rid)
            assert victim.status is RequestStatus.PREEMPTED
            assert all(self.policy_key(r) < self.policy_key(victim) for r in still_running)

    def policy_key(self, request: Request) -> tuple:
        priority = request.priority if self.sched.policy == "priority" else 0
        return priority, request.arrival_time

    def forward(self, out: SchedulerOutput) -> None:
        """Write every new token's KV, then check all that each live request attends to.

        The runner executes a whole output, requests aborted since schedule() included: others
        may have hit their blocks in the same step.
        """
        for s in out.scheduled:
            tokens = s.request.all_token_ids
            for pos in range(s.start, s.start + s.num_new_tokens):
                self.slots[(s.block_ids[pos // BS], pos % BS)] = (s.request.lora_id, tuple(tokens[: pos + 1]))
        for s in out.scheduled:
            if s.request.status is not RequestStatus.RUNNING:
                continue
            tokens = s.request.all_token_ids
            for pos in range(s.start + s.num_new_tokens):
                # Written by this adapter (0: the base model) for these tokens: prefix-cache hits
                # never cross adapters.
                assert self.slots.get((s.block_ids[pos // BS], pos % BS)) == (s.request.lora_id, tuple(tokens[: pos + 1]))

    def check_state(self, in_flight: SchedulerOutput | None = None) -> None:
        """``in_flight``: a look-ahead step launched and not yet run, whose blocks are held."""
        sched, kv = self.sched, self.sched.kv
        held: Counter[int] = Counter()
        ahead = {s.request.request_id: s.start + s.num_new_tokens for s in in_flight.scheduled} if in_flight else {}
        for req in self.requests:
            ids = kv.block_ids(req.request_id)
            assert req.num_pending_tokens == 0  # every sampled token is known once its step is updated
            if req.status is RequestStatus.RUNNING:
                assert sched.get_request(req.request_id) is req
                covered = ahead.get(req.request_id, req.num_computed_tokens)
                assert len(ids) == -(-covered // BS)  # covers them, no waste
                held.update(ids)
            else:
                assert ids == []
                if req.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED):
                    assert req.num_computed_tokens == 0
                else:
                    assert sched.get_request(req.request_id) is None
            assert len(req.output_token_ids) <= req.sampling_params.max_tokens
        assert NULL_BLOCK_ID not in held
        for block in kv.pool.blocks:
            assert block.ref_cnt == held[block.block_id] >= 0
        assert kv.num_free_blocks + len(held) + 1 == kv.pool.num_blocks
        statuses = Counter(req.status for req in self.requests)
        assert sched.num_running == statuses[RequestStatus.RUNNING] <= sched.max_num_seqs
        assert sched.num_waiting == statuses[RequestStatus.WAITING] + statuses[RequestStatus.PREEMPTED]


@pytest.mark.parametrize("mode", ["step_by_step", "look_ahead", "micro_batches"])
@settings(deadline=None, max_examples=120)
@given(
    num_blocks=st.integers(6, 10),
    max_num_seqs=st.integers(1, 5),
    budget=st.integers(1, 16),
    policy=st.sampled_from(["fcfs", "priority"]),
    caching=st.booleans(),
    seed=st.integers(0, 2**16),
    ops=st.lists(OPS, min_size=20, max_size=60),
)
def test_random_operations_keep_requests_and_blocks_consistent(mode, num_blocks, max_num_seqs, budget, policy,
                                                               caching, seed, ops):
    """Steps run as EngineCore runs them. ``look_ahead``: step n + 1 is scheduled before step
    n's tokens are known, and runs after they are. ``micro_batches``: as with two pipeline
    stages, up to two steps are in flight, the second scheduled from requests the first does
    not hold; they run and are applied oldest first."""
    sched = make_scheduler(num_blocks, max_num_seqs, budget, policy, caching, max_loras=MAX_LORAS)
    max_model_len = (num_blocks - 1) * BS  # the engine guarantees one request fits the cache
    checker = Checker(sched)
    rng = random.Random(seed)
    in_flight: SchedulerOutput | None = None
    micro_batches: list[SchedulerOutput] = []

    def computing() -> set[str]:
        return {s.request.request_id for out in micro_batches for s in out.scheduled}

    def launched() -> SchedulerOutput | None:
        """Every step launched and not yet applied, as one output (their requests differ)."""
        if mode == "micro_batches":
            return SchedulerOutput([s for out in micro_batches for s in out.scheduled]) if micro_batches else None
        return in_flight

    def apply(out: SchedulerOutput, abort_mid_step: int | None) -> None:
        if abort_mid_step is not None and out.scheduled:
            sched.abort_requests([out.scheduled[abort_mid_step % len(out.scheduled)].request.request_id])
        checker.forward(out)
        sampled = {s.request.request_id: [rng.randrange(10)] for s in out.scheduled if s.sample}
        updated = sched.update(out, sampled)
        assert all(req.request_id in sampled for req in updated)

    def run_step(abort_mid_step: int | None = None) -> None:
        nonlocal in_flight
        if mode == "micro_batches":
            while len(micro_batches) < 2:
                busy = computing()
                share = -(-(sched.num_running + sched.num_waiting) // 2)
                out = sched.schedule(busy, max_seqs=max(1, share))
                checker.check_schedule(out)
                assert len(out.scheduled) <= max(1, share)
                assert not busy & {s.request.request_id for s in out.scheduled} and not busy & set(out.preempted_ids)
                if not out.scheduled:
                    break
                micro_batches.append(out)
            if micro_batches:
                apply(micro_batches.pop(0), abort_mid_step)
            return
        out, in_flight = in_flight, None
        if out is None:
            out = sched.schedule()
            checker.check_schedule(out)
        following = sched.look_ahead(out) if mode == "look_ahead" else None
        if following is not None:
            checker.check_schedule(following)
        apply(out, abort_mid_step)
        in_flight = following

    for op, arg in ops:
        if op == "add":
            for prompt, max_tokens, priority, eos, lora_id in arg:
                req = Request(f"r{len(checker.requests)}", prompt, SamplingParams(max_tokens=max_tokens),
                              eos_token_ids=frozenset({EOS} if eos else ()), max_model_len=max_model_len,
                              priority=priority, arrival_time=float(len(checker.requests)), lora_id=lora_id)
                checker.requests.append(req)
                sched.add_request(req)
        elif op == "step":
            run_step()
        elif op == "abort_mid_step":
            run_step(abort_mid_step=arg)
        elif checker.requests:
            target = checker.requests[arg % len(checker.requests)]
            if op == "abort":
                sched.abort_requests([target.request_id])
                assert target.status.finished and sched.kv.block_ids(target.request_id) == []
            else:
                sched.finish_requests([target.request_id], RequestStatus.FINISHED_STOPPED)
        checker.check_state(launched())

    for _ in range(2000):
        if not sched.has_unfinished_requests() and launched() is None:
            break
        run_step()
        checker.check_state(launched())
    assert not sched.has_unfinished_requests() and launched() is None
    assert sched.kv.num_free_blocks == num_blocks - 1
    for req in checker.requests:
        if req.status is RequestStatus.FINISHED_LENGTH:
            assert req.num_tokens == req.max_total_tokens
