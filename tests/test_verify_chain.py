"""Verification steps chained on the device (worker/verify_chain.py), on the CPU.

On tests/test_decode_graphs.py's replay platform (a "graph" reruns the captured forward on the
runner's persistent buffers, so a chained step reads exactly the inputs it wrote there): the
device n-gram proposer against the host's, token for token; greedy output with chains equal to
the engine's without proposals, with requests arriving, finishing at different lengths, stopping
on a token and aborted while a chained step is in flight; the proposals a chained step read back
equal to what the host's proposer makes from the same tokens; and the conditions that send a
step back to the host.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_decode_graphs import _registry, _run
from test_spec_decode import _repetitive_prompts
from tiny_models import make_tiny_checkpoint

from runtime.engine.args import EngineArgs
from runtime.engine.core import EngineCore
from runtime.sample.params import SamplingParams
from runtime.sched.scheduler import ScheduledRequest
from runtime.platform.reference import propose_ngram_batched
from runtime.spec.ngram import propose_ngram

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
COMMON = dict(device="replay_cpu", max_num_seqs=6, max_model_len=160, kv_cache_memory="4MiB",
              max_num_batched_tokens=64)
PROMPTS = _repetitive_prompts(7, seed=11)
MAX_TOKENS = [40, 9, 52, 23, 31, 17, 44]


@pytest.mark.parametrize("seed", range(4))
def test_batched_device_proposals_equal_the_host_proposer(seed):
    """Random rows (small vocabularies, so runs of every length repeat; tokens past each row's
    length are garbage the proposer must not read) against ``propose_ngram`` row by row."""
    rng = np.random.default_rng(seed)
    for _ in range(60):
        batch, capacity = 5, 70
        lengths = rng.integers(1, capacity + 1, batch)
        history = rng.integers(0, int(rng.integers(2, 7)), (batch, capacity))
        k, low = int(rng.integers(1, 6)), int(rng.integers(1, 4))
        high = low + int(rng.integers(0, 4))
        drafts, counts = propose_ngram_batched(torch.from_numpy(history), torch.from_numpy(lengths), k, low, high)
        assert drafts.shape == (batch, k)
        for b in range(batch):
            expected = propose_ngram(history[b, :lengths[b]], k, low, high)
            assert drafts[b, :counts[b]].tolist() == expected
            assert not drafts[b, counts[b]:].any()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("verify_chain"), "llama")


@pytest.fixture(scope="module")
def reference(checkpoint) -> dict[str, list]:
    eager = EngineCore(EngineArgs(model=str(checkpoint), enforce_eager=True, **COMMON), registry=_registry())
    return _run(eager, PROMPTS, MAX_TOKENS)


def _chained_engine(checkpoint, always: bool = True) -> tuple[EngineCore, list[tuple[bool, int]]]:
    """An n-gram engine, and per chained launch (whether it followed a chained step, its batch).

    ``always``: chain even after steps that verified no proposal. The tiny random model seldom
    repeats itself, so most of its steps find none and would go back to the host
    (``EngineCore._proposing``); chaining anyway runs the chain's bookkeeping over many steps,
    with and without proposals, as repetitive text would.
    """
    engine = EngineCore(EngineArgs(model=str(checkpoint), speculative_config=NGRAM, **COMMON), registry=_registry())
    assert engine.chains_verification
    if always:
        engine._proposing = lambda out: True
    runner, chained = engine.runner, []
    launch_chained = runner.launch_chained

    def recorded(out, previous):
        chained.append((previous.chained, len(out.scheduled)))
        return launch_chained(out, previous)

    runner.launch_chained = recorded
    return engine, chained


def test_greedy_output_with_chained_verifications_equals_eager_output(checkpoint, reference):
    engine, chained = _chained_engine(checkpoint)
    assert _run(engine, PROMPTS, MAX_TOKENS) == reference
    assert sum(1 for after_chained, _ in chained if after_chained) > 10, "chains never went past one step"
    assert len({batch for _, batch in chained}) >= 3, "chains of one or two batch sizes only"
    stats = engine.stats()
    assert 0 < stats.spec_num_accepted_tokens < stats.spec_num_draft_tokens
    assert engine.kv_manager.usage == 0


def test_chained_proposals_are_the_host_proposers(checkpoint, monkeypatch):
    """Each chained step's proposals, read back with its tokens, are what ``propose_ngram``
    makes from the request's tokens known before that step."""
    engine, chained = _chained_engine(checkpoint)
    checked = []
    resolve = ScheduledRequest.resolve

    def checking(item, draft_token_ids):
        # Resolved once the step before is applied: every token up to this step's first is known.
        expected = propose_ngram(np.array(item.request.all_token_ids), item.max_drafts, 1, 3)
        assert draft_token_ids == expected
        checked.append(len(expected))
        resolve(item, draft_token_ids)

    monkeypatch.setattr(ScheduledRequest, "resolve", checking)
    _run(engine, PROMPTS, MAX_TOKENS)
    assert len(checked) >= sum(batch for _, batch in chained) - len(PROMPTS)
    assert any(checked) and 0 in checked


def test_a_stop_token_and_requests_stopped_mid_chain_keep_exactly_their_tokens(checkpoint, reference):
    """Request 2 stops on a token, request 3 is finished by the caller (as a stop string is) and
    request 4 aborted, each with a chained step in flight that computes them once more: every
    request keeps exactly the tokens the engine without proposals gives it, and every block
    comes back. Six requests: all of them run from the start, so chains begin at once."""
    stop_token = [t for t in reference["2"] if isinstance(t, int)][20]
    engine, chained = _chained_engine(checkpoint)
    for i, prompt in enumerate(PROMPTS[:6]):
        stop = [stop_token] if i == 2 else []
        engine.add_request(str(i), prompt, SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=MAX_TOKENS[i],
                                                          stop_token_ids=stop))
    tokens: dict[str, list[int]] = {str(i): [] for i in range(6)}
    stop_after, stopped_at, in_chain = {"3": 7, "4": 12}, {}, []
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens[out.request_id].extend(out.new_token_ids)
        for rid, count in stop_after.items():
            if rid not in stopped_at and len(tokens[rid]) >= count:
                in_flight, _ = engine._in_flight or (None, None)
                in_chain.append(in_flight is not None and in_flight.scheduled[0].chained)
                (engine.finish_requests if rid == "3" else engine.abort_requests)([rid])
                stopped_at[rid] = len(tokens[rid])
    assert stopped_at.keys() == stop_after.keys() and any(in_chain)
    for rid, got in tokens.items():
        expected = [t for t in reference[rid] if isinstance(t, int)]
        if rid == "2":
            expected = expected[:expected.index(stop_token) + 1]
        assert got == expected[:stopped_at.get(rid, len(expected))]
    assert chained and engine.kv_manager.usage == 0


def test_steps_with_sampling_other_than_the_argmax_are_not_chained(checkpoint):
    """A seeded random request in the batch keeps every step on the host (every request's
    tokens equal to the same engine's with chains turned off); alone, the greedy requests
    chain."""
    engine, chained = _chained_engine(checkpoint)
    unchained = EngineCore(EngineArgs(model=str(checkpoint), speculative_config=NGRAM, **COMMON), registry=_registry())
    unchained.chains_verification = False
    unchained._proposing = engine._proposing  # the same look-ahead rule (EngineCore._looks_ahead)
    prompts = PROMPTS[:3]
    results = []
    for each in (engine, unchained):
        for i, prompt in enumerate(prompts):
            params = dict(temperature=0.8, seed=7) if i == 1 else dict(temperature=0.0)
            each.add_request(str(i), prompt, SamplingParams(max_tokens=30, ignore_eos=True, **params))
        got: dict[str, list[int]] = {}
        while each.has_unfinished_requests():
            for out in each.step():
                got.setdefault(out.request_id, []).extend(out.new_token_ids)
        results.append(got)
    assert results[0] == results[1]
    assert not chained
    assert _run(engine, prompts, [30, 30, 30]) == _run(unchained, prompts, [30, 30, 30])
    assert chained


def test_waiting_requests_end_a_chain(checkpoint):
    """A request that arrives while a chain runs is admitted by the next step the host
    schedules, right after the chained step in flight."""
    engine, chained = _chained_engine(checkpoint)
    engine.add_request("0", PROMPTS[0], SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=40))
    while len(chained) < 3:
        engine.step()
    engine.add_request("1", PROMPTS[1], SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=5))
    engine.step()  # the chained step in flight comes back; the next is the host's, admitting request 1
    in_flight, _ = engine._in_flight
    assert not in_flight.scheduled[0].chained
    assert {s.request.request_id for s in in_flight.scheduled} == {"0", "1"}
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.kv_manager.usage == 0


def test_chains_follow_steps_likely_to_find_proposals(checkpoint, reference):
    """With the engine's own rule a chained step follows a step that verified proposals (its
    own, or the applied step before a chained one) or one where a request not pausing its
    proposals (back-off) has tokens read back so far that propose something; where none of that
    holds the host's plain decode steps (1 row a request, not 1 + k) run instead. A chain also
    begins from a plain decode step launched ahead (its input token still on the device). A
    request pausing its proposals stays in the chain with no room for them: its chained steps
    verify none, and each counts towards its pause."""
    engine, _ = _chained_engine(checkpoint, always=False)
    followed, chain, outputs = [], engine._chain, engine._outputs
    paused_rows: list[ScheduledRequest] = []

    def recorded(out, pending):
        pauses = [s.request.proposal_pause for s in out.scheduled]
        following = chain(out, pending)
        if following is not None:
            verified = engine._verified_last if out.scheduled[0].chained else any(
                s.draft_token_ids for s in out.scheduled)
            known = any(propose_ngram(np.array(s.request.all_token_ids), 1, NGRAM["prompt_lookup_min"],
                                      NGRAM["prompt_lookup_max"]) for s, pause in zip(out.scheduled, pauses) if not pause)
            ahead = any(s.token_pending for s in out.scheduled)
            followed.append((verified or known, ahead))
            for item, pause in zip(following[0].scheduled, pauses):
                assert item.max_drafts == (0 if pause else NGRAM["num_speculative_tokens"])
                assert item.request.proposal_pause == max(0, pause - 1)
                if pause:
                    paused_rows.append(item)
        return following

    def applied(out, result):
        for item in out.scheduled:
            if item.chained:
                assert len(result.drafts[item.request.request_id]) <= item.max_drafts
        return outputs(out, result)

    declined, proposing = [], engine._proposing

    def rule(out):
        likely = proposing(out)
        declined.append(not likely)
        return likely

    engine._chain, engine._outputs, engine._proposing = recorded, applied, rule
    assert _run(engine, PROMPTS, MAX_TOKENS) == reference
    assert followed and all(likely for likely, _ in followed)
    assert any(ahead for _, ahead in followed), "no chain began from a step launched ahead"
    assert paused_rows, "no chained step held a request pausing its proposals"
    assert all(not item.draft_token_ids for item in paused_rows)
    plain_steps = sum(n for (_, query_len), n in engine.runner.decode_graphs.replays.items() if query_len == 1)
    assert any(declined) and plain_steps >= sum(declined)


def test_chains_begin_from_steps_launched_ahead(checkpoint, reference):
    """Chains only from plain decode steps launched ahead (their input token still on the device,
    the step before them read back): each chain one step long, then a step made on the host
    (which may verify proposals of its own, and is never looked past), then one launched ahead.
    The output is the engine's without proposals."""
    engine, _ = _chained_engine(checkpoint, always=False)
    engine._proposing = lambda out: not out.scheduled[0].chained and any(s.token_pending for s in out.scheduled)
    launch_chained, after_ahead = engine.runner.launch_chained, []

    def recorded(out, previous):
        after_ahead.append(not previous.chained and any(s.token_pending for s in previous.scheduled))
        return launch_chained(out, previous)

    engine.runner.launch_chained = recorded
    assert _run(engine, PROMPTS, MAX_TOKENS) == reference
    assert sum(after_ahead) >= 3
    assert engine.kv_manager.usage == 0


def test_steps_with_nothing_to_propose_are_launched_ahead_one_after_another(checkpoint, reference):
    """Where verifications chain, a decode step whose requests' known tokens propose nothing is
    followed by one launched ahead, itself too: a proposal that the token in flight brings up
    goes to a chain one step later. (Without chains a step launched ahead gives no request room
    for proposals, so the next is made on the host unless every request pauses.)"""
    engine = EngineCore(EngineArgs(model=str(checkpoint), speculative_config=NGRAM | {"prompt_lookup_min": 2},
                                   **COMMON), registry=_registry())
    assert engine.chains_verification
    launched_ahead, in_a_row, launch = set(), [], engine._launch

    def recorded(out, previous=None):
        pending = launch(out, previous)
        if previous is not None:
            if id(previous) in launched_ahead and not all(s.request.proposal_pause for s in out.scheduled):
                in_a_row.append(len(out.scheduled))
            launched_ahead.add(id(pending))
        return pending

    engine._launch = recorded
    assert _run(engine, PROMPTS, MAX_TOKENS) == reference
    assert len(in_a_row) > 10


def test_histories_past_the_bound_verify_on_the_host(checkpoint, reference, monkeypatch):
    """A batch whose histories (requests x width) would pass ``MAX_CHAIN_HISTORY`` is never
    chained (the n-gram search's graph would hold memory the KV cache's sizing left out); its
    output is unchanged."""
    from runtime.worker import model_runner
    engine, chained = _chained_engine(checkpoint)
    # Histories here are 160 wide (--max-model-len): one request alone passes a bound of 128.
    monkeypatch.setattr(model_runner, "MAX_CHAIN_HISTORY", 128)
    assert _run(engine, PROMPTS, MAX_TOKENS) == reference
    assert not chained


def test_a_chained_step_has_blocks_for_the_furthest_it_can_reach(checkpoint, reference):
    """When a step is chained its requests' blocks cover the step in flight accepting all of its
    proposals and then 1 + k more tokens: a position past them would read its slot from a column
    of the block table that holds no block of the request."""
    engine, chained = _chained_engine(checkpoint)
    chain, block_size = engine.scheduler.chain, engine.block_size

    def checked(output, limit):
        # The step in flight (output) starts at num_computed_tokens; two steps of 1 + k past it.
        furthest = {s.request.request_id: s.request.num_computed_tokens + 2 * 5 for s in output.scheduled}
        following = chain(output, limit)
        if following is not None:
            for item in following.scheduled:
                assert len(item.block_ids) * block_size >= furthest[item.request.request_id]
        return following

    engine.scheduler.chain = checked
    assert _run(engine, PROMPTS, MAX_TOKENS) == reference
    assert chained
