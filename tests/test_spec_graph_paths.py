"""Which path a speculative step takes, and what early launching does to outputs (CPU).

On tests/test_decode_graphs.py's replay platform (a "graph" reruns the captured forward on the
runner's persistent buffers): a decode step whose requests mix proposals and none replays a
verification graph, never runs eagerly, and greedy output equals the eager engine's without
proposals. With graphs, a speculative engine launches the next step before returning a step's
outputs (``EngineCore.launch_early``): a request finished or aborted by the caller meanwhile
keeps exactly the tokens it had. The layout of verified rows is checked against a brute-force
one.
"""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch
from test_decode_graphs import _registry, _run
from test_spec_decode import _repetitive_prompts
from tiny_models import make_tiny_checkpoint

from runtime.engine.args import EngineArgs
from runtime.engine.core import EngineCore
from runtime.sample.params import SamplingParams
from runtime.sample.sampler import Sampler, SamplingMetadata
from runtime.sched.request import Request
from runtime.spec.ngram import propose_ngram
from runtime.spec.rejection import DraftLayout

NGRAM = {"method": "ngram", "num_speculative_tokens": 4}
COMMON = dict(max_num_seqs=6, max_model_len=128, kv_cache_memory="4MiB", max_num_batched_tokens=64)
PROMPTS = _repetitive_prompts(6, seed=5)
MAX_TOKENS = [21, 13, 25, 9, 17, 23]


class OracleProposer:
    """Proposes each request's known greedy continuation; requests with odd ids propose only on
    every other step, and those with ids 2 mod 3 get their third proposal wrong, so batches mix
    full acceptance, partial acceptance and rows without proposals."""

    def __init__(self, outputs: dict[str, list[int]]):
        self.outputs = outputs
        self.calls = 0

    def propose(self, out) -> None:
        self.calls += 1
        for item in out.scheduled:
            request = item.request
            number = int(request.request_id)
            if not item.max_drafts or (number % 2 and self.calls % 2):
                continue
            done = len(request.output_token_ids)
            drafts = list(self.outputs[request.request_id][done:done + item.max_drafts])
            if number % 3 == 2 and len(drafts) > 2:
                drafts[2] = (drafts[2] + 1) % 300
            item.set_drafts(drafts)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("spec_paths"), "llama")


@pytest.fixture(scope="module")
def reference(checkpoint) -> dict[str, list]:
    eager = EngineCore(EngineArgs(model=str(checkpoint), device="replay_cpu", enforce_eager=True, **COMMON),
                       registry=_registry())
    return _run(eager, PROMPTS, MAX_TOKENS)


def _oracle_engine(checkpoint, reference) -> EngineCore:
    engine = EngineCore(EngineArgs(model=str(checkpoint), device="replay_cpu", speculative_config=NGRAM, **COMMON),
                        registry=_registry())
    engine.proposer = OracleProposer({rid: [t for t in tokens if isinstance(t, int)]
                                      for rid, tokens in reference.items()})
    engine.chains_verification = False  # a chain proposes by n-gram on the device, not by the oracle
    return engine


def test_decode_steps_mixing_proposals_and_none_replay_verification_graphs(checkpoint, reference):
    engine = _oracle_engine(checkpoint, reference)
    runner, paths = engine.runner, []
    launch = runner.launch

    def recorded(out, *args, **kwargs):
        before = dict(runner.decode_graphs.replays)
        pending = launch(out, *args, **kwargs)
        replayed = [shape for shape, n in runner.decode_graphs.replays.items() if n != before.get(shape, 0)]
        decoding = bool(out.scheduled) and all(s.start >= s.request.num_prompt_tokens for s in out.scheduled)
        drafts = [len(s.draft_token_ids) for s in out.scheduled]
        paths.append((decoding, drafts, replayed))
        return pending

    runner.launch = recorded
    assert _run(engine, PROMPTS, MAX_TOKENS) == reference
    for decoding, drafts, replayed in paths:
        if decoding:
            assert len(replayed) == 1, f"a decode step with proposals {drafts} ran eagerly"
            assert replayed[0][1] == (5 if any(drafts) else 1)
    mixed = [drafts for decoding, drafts, _ in paths if decoding and 0 in drafts and any(drafts)]
    assert len(mixed) >= 3, "no decode step mixed rows with and without proposals"
    stats = engine.stats()
    assert 0 < stats.spec_num_accepted_tokens < stats.spec_num_draft_tokens
    assert engine.kv_manager.usage == 0


def test_requests_finished_while_the_next_step_is_in_flight_keep_their_tokens(checkpoint, reference):
    """The caller finishes request 1 (as a stop string does) and aborts request 4 after a few
    tokens, each time with the next step already launched: they keep exactly the tokens they
    had, the others are unchanged, and every block comes back."""
    engine = _oracle_engine(checkpoint, reference)
    assert engine.launch_early
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(str(i), prompt, SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=MAX_TOKENS[i]))
    tokens: dict[str, list[int]] = {str(i): [] for i in range(len(PROMPTS))}
    stop_after, stopped_at = {"1": 5, "4": 3}, {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens[out.request_id].extend(out.new_token_ids)
        for rid, count in stop_after.items():
            if rid not in stopped_at and len(tokens[rid]) >= count:
                in_flight, _ = engine._in_flight
                assert rid in {s.request.request_id for s in in_flight.scheduled}
                (engine.finish_requests if rid == "1" else engine.abort_requests)([rid])
                stopped_at[rid] = len(tokens[rid])
    assert stopped_at.keys() == stop_after.keys()
    for rid, got in tokens.items():
        expected = [t for t in reference[rid] if isinstance(t, int)]
        assert got == expected[:stopped_at.get(rid, len(expected))]
    assert engine.kv_manager.usage == 0


def _recorded_launches(engine: EngineCore) -> list[tuple[bool, list[int]]]:
    """Per launched step: (launched ahead, behind a step still in flight; its proposal counts)."""
    runner, launches = engine.runner, []
    launch = runner.launch

    def recorded(out, previous=None, *args, **kwargs):
        if out.scheduled:
            launches.append((previous is not None, [len(s.draft_token_ids) for s in out.scheduled]))
        return launch(out, previous, *args, **kwargs)

    runner.launch = recorded
    return launches


@pytest.mark.parametrize("min_n", [1, 2])
def test_the_ngram_engine_looks_ahead_after_steps_without_proposals(min_n, checkpoint, reference):
    """With the n-gram proposer and verifications made on the host, steps launched ahead (behind
    one in flight, no room for proposals) follow only steps that verified none; two in a row
    only where the requests' tokens read back so far propose nothing (by ``propose_ngram``), or
    every request pauses: a step launched ahead gives no request room, so where their tokens
    propose, the next step is made on the host to verify them. The output is the engine's without
    proposals, and proposals are still verified (the tiny random model accepts none)."""
    # Matches of one token (the random model's outputs find many) and of two (they find none).
    config = NGRAM | {"prompt_lookup_min": min_n, "prompt_lookup_max": 3}
    engine = EngineCore(EngineArgs(model=str(checkpoint), device="replay_cpu", speculative_config=config, **COMMON),
                        registry=_registry())
    engine.chains_verification = False
    runner, launches = engine.runner, []
    launch = runner.launch

    def recorded(out, previous=None, *args, **kwargs):
        if out.scheduled:
            # Whether the requests of the step in flight (the last launched) propose on their
            # tokens known now, and all pause: what the engine weighed before launching this one.
            before = launches[-1][2] if launches else []
            proposes = any(propose_ngram(np.array(r.all_token_ids), 1, min_n, min_n) for r in before)
            paused = bool(before) and all(r.proposal_pause for r in before)
            launches.append((previous is not None, [len(s.draft_token_ids) for s in out.scheduled],
                             [s.request for s in out.scheduled], proposes, paused))
        return launch(out, previous, *args, **kwargs)

    runner.launch = recorded
    assert _run(engine, PROMPTS, MAX_TOKENS) == reference
    ahead = [i for i, launched in enumerate(launches) if launched[0]]
    assert ahead, "no step was launched ahead"
    in_a_row = 0
    for i in ahead:
        assert not any(launches[i][1]), "a step launched ahead had room for proposals"
        assert not any(launches[i - 1][1]), "a step verifying proposals was looked past"
        if launches[i - 1][0]:
            in_a_row += 1
            assert not launches[i][3] or launches[i][4], "looked past a step whose requests' tokens propose"
    if min_n == 1:
        assert engine.stats().spec_num_drafts > 0
    else:
        assert in_a_row > 5, "steps proposing nothing were not launched ahead one after another"
    assert engine.kv_manager.usage == 0


class _WrongProposals:
    """Four proposals a step that the greedy output never takes (token 1 is never sampled here)."""

    may_skip_steps = True

    def propose(self, out) -> None:
        for item in out.scheduled:
            if item.max_drafts:
                item.set_drafts([1] * item.max_drafts)


def test_paused_proposals_count_down_through_steps_launched_ahead(checkpoint):
    """Every proposal rejected: the back-off pauses (0, 1, 3, 7, ... steps after the z-th rejected
    step, Request.count_proposals) pass in steps launched ahead one after another, and each
    pause's end brings a verification step at once; the output unchanged."""
    prompt, tokens = list(range(20, 36)), 100
    plain = EngineCore(EngineArgs(model=str(checkpoint), device="replay_cpu", enforce_eager=True, **COMMON),
                       registry=_registry())
    expected = _run(plain, [prompt], [tokens])
    assert 1 not in expected["0"]
    engine = EngineCore(EngineArgs(model=str(checkpoint), device="replay_cpu", speculative_config=NGRAM, **COMMON),
                        registry=_registry())
    engine.proposer = _WrongProposals()
    engine.chains_verification = False  # a chain proposes by n-gram on the device
    launches = _recorded_launches(engine)
    assert _run(engine, [prompt], [tokens]) == expected
    verified = [i for i, (_, drafts) in enumerate(launches) if any(drafts)]
    assert [b - a for a, b in zip(verified, verified[1:])] == [1, 2, 4, 8, 16, 32]
    assert max(sum(1 for _ in run) for behind, run in itertools.groupby(b for b, _ in launches) if behind) >= 7

def test_draft_layout_matches_a_brute_force_layout():
    rng = random.Random(0)
    drafts = [[rng.randrange(1, 50) for _ in range(rng.randrange(0, 5))] for _ in range(9)]
    requests = [Request(str(i), [5, 6], SamplingParams(), max_model_len=64) for i in range(len(drafts))]
    layout = DraftLayout(requests, drafts, torch.device("cpu"))
    rows = [(b, j) for b, d in enumerate(drafts) for j in range(len(d) + 1)]
    width = max(len(d) for d in drafts) + 1
    assert layout.num_rows == len(rows)
    tensors = layout.tensors
    assert tensors.following.tolist() == [drafts[b][j] if j < len(drafts[b]) else -1 for b, j in rows]
    assert tensors.row_request.tolist() == [b for b, _ in rows]
    assert tensors.row_position.tolist() == [j for _, j in rows]
    for b, d in enumerate(drafts):
        for j in range(width):
            assert rows[tensors.index[b, j]] == (b, min(j, len(d)))
            assert tensors.proposed[b, j] == (d[j] if j < len(d) else -1)
    views = layout.row_views
    assert [v.output_token_ids for v in views] == [drafts[b][:j] for b, j in rows]


def test_greedy_rows_matched_on_the_host_emit_what_rejection_sampling_on_the_device_does():
    """All-greedy verification without logprobs leaves the matching to ``DraftLayout.emitted``
    on the host, copying none of the layout's index tensors to the device; with logprobs it runs
    on the device. Both emit the same tokens."""
    rng = random.Random(1)
    torch.manual_seed(1)
    vocab, batch = 8, 12  # a small vocabulary, so proposals often equal the argmax
    drafts = [[rng.randrange(vocab) for _ in range(rng.randrange(0, 5))] for _ in range(batch)]
    layout_rows = sum(len(d) + 1 for d in drafts)
    logits = torch.randn(layout_rows, vocab)
    emitted = []
    for logprobs in (None, 2):
        requests = [Request(str(i), [5, 6], SamplingParams(temperature=0.0, logprobs=logprobs), max_model_len=64)
                    for i in range(batch)]
        layout = DraftLayout(requests, drafts, torch.device("cpu"))
        out = Sampler().verify(logits, SamplingMetadata.from_requests(layout.row_views, vocab, "cpu", {}), layout)
        assert (out.num_tokens is None) == (logprobs is None)
        emitted.append(layout.emitted(out))
        assert ("tensors" in vars(layout)) == (logprobs is not None)
    assert emitted[0] == emitted[1]
    assert any(1 < len(tokens) < len(d) + 1 for tokens, d in zip(emitted[0], drafts)), "no partial acceptance"
