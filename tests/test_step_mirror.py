"""Rank 0's step messages keep each worker's copy of every request's tokens equal to rank 0's.

The workers of a tensor-parallel engine (``runtime.worker.mirror``) keep their own copy of each
request's tokens, appending what every step samples. A look-ahead step that preempts a request
drops the token still in flight for it on rank 0; the copies must drop it too, or a readmitted
request would be computed from a token rank 0 never kept.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from runtime.kv.manager import KVCacheManager
from runtime.sample.params import SamplingParams
from runtime.sched.request import Request
from runtime.sched.scheduler import Scheduler
from runtime.worker.mirror import Collect, StepMirror, StepSender, decode, encode


class RecordingRunner:
    """Stands in for a worker's model runner: records the tokens each launched step computes
    from the worker's copies, and reads back what rank 0 says the step sampled."""

    pp = SimpleNamespace(size=1, is_last=True)

    def __init__(self) -> None:
        self.computed: list[list[tuple[str, int, list[int]]]] = []
        self.sampled: dict[int, dict[str, list[int]]] = {}

    def launch(self, out, previous, grammar, sample):
        self.computed.append([(s.request.request_id, s.start,
                               s.request.all_token_ids[s.start:s.start + s.num_new_tokens - s.token_pending])
                              for s in out.scheduled])
        return len(self.computed) - 1

    def collect(self, pending):
        return SimpleNamespace(sampled=self.sampled[pending])


@pytest.mark.parametrize("look_ahead", [True, False])
@pytest.mark.parametrize("seed", range(3))
def test_worker_copies_follow_rank_0_through_preemptions(look_ahead, seed):
    rng = random.Random(seed)
    block_size = 4
    scheduler = Scheduler(KVCacheManager(12, block_size), max_num_seqs=6, max_num_batched_tokens=16)
    for i in range(6):
        prompt = [rng.randrange(1, 100) for _ in range(rng.randrange(3, 12))]
        scheduler.add_request(Request(f"r{i}", prompt, SamplingParams(max_tokens=rng.randrange(8, 20), ignore_eos=True),
                                      max_model_len=40))
    sender, runner = StepSender(), RecordingRunner()
    mirror = StepMirror(runner, max_model_len=40)
    expected: list[list[tuple[str, int, list[int]]]] = []

    def launch(out) -> int:
        # What rank 0's runner computes: its own tokens at the chunk's known positions.
        expected.append([(s.request.request_id, s.start,
                          s.request.all_token_ids[s.start:s.start + s.num_new_tokens - s.token_pending])
                         for s in out.scheduled])
        message, step = sender.launch(out, None)
        mirror.handle(decode(encode(message)))
        return step

    preempted_in_flight = 0
    in_flight = None
    while scheduler.has_unfinished_requests() or in_flight is not None:
        if in_flight is None:
            out = scheduler.schedule()
            step = launch(out)
        else:
            out, step = in_flight
        in_flight = None
        following = scheduler.look_ahead(out) if look_ahead else None
        if following is not None:
            preempted_in_flight += len(following.preempted_ids)
            in_flight = (following, launch(following))
        sampled = {s.request.request_id: [rng.randrange(1, 100)] for s in out.scheduled if s.sample}
        runner.sampled[step] = sampled
        mirror.handle(decode(encode(Collect(step))))
        scheduler.update(out, sampled)
        for rid, copy in mirror.requests.items():
            request = scheduler.get_request(rid)
            if request is not None:
                assert copy.all_token_ids == request.all_token_ids, rid
    assert runner.computed == expected
    assert scheduler.num_preemptions > 0
    assert not look_ahead or preempted_in_flight > 0
