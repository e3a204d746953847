"""Speculative decoding: proposals never change what is generated.

Greedy output with proposals equals output without them, token for token (every architecture,
chunked prefill, preemption, requests arriving mid-run); sampled output keeps its distribution
(chi-square against the distribution computed directly, and two-sample between runs with and
without proposals); the KV cache after rejections holds what a run without proposals computes.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from test_sampler import chi_square_p_value, make_request
from tiny_models import ARCHITECTURES, make_tiny_checkpoint

from runtime import LLM, SamplingParams
from runtime.platform.reference import apply_top_k_top_p_min_p
from runtime.sample.sampler import Sampler, SamplingMetadata, argmax_only
from runtime.kv.manager import KVCacheManager
from runtime.sched.request import Request
from runtime.sched.scheduler import ScheduledRequest, Scheduler, SchedulerOutput
from runtime.spec import SpeculativeConfig
from runtime.spec.ngram import NgramProposer, propose_ngram
from runtime.spec.rejection import DraftLayout

COPY_TASK = ("Repeat the following paragraph exactly.\n\nThe old lighthouse stood on the northern cliff for two "
             "hundred years. Every night its keeper climbed the narrow stairs, lit the great lamp, and watched the "
             "ships pass safely through the dark and dangerous waters below.")
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3}


def _reference_ngram(tokens: list[int], k: int, low: int, high: int) -> list[int]:
    """The rule written out: the largest n, then the latest earlier occurrence."""
    for n in range(high, low - 1, -1):
        if n >= len(tokens):
            continue
        suffix = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start:start + n] == suffix:
                return tokens[start + n:start + n + k]
    return []


def test_ngram_proposals_follow_the_latest_longest_match():
    rng = random.Random(0)
    for _ in range(400):
        tokens = [rng.randrange(4) for _ in range(rng.randrange(1, 40))]
        k, low = rng.randrange(1, 6), rng.randrange(1, 4)
        high = low + rng.randrange(0, 3)
        got = propose_ngram(np.array(tokens), k, low, high)
        assert got == _reference_ngram(tokens, k, low, high), (tokens, k, low, high)


def test_the_ngram_proposer_reads_each_request_as_it_grows():
    """The proposer keeps each request's tokens as an array it extends step by step: every
    step's proposal is the brute-force one over the whole sequence, also for a request that
    finishes and a new one under the same id."""
    rng = random.Random(1)
    proposer = NgramProposer(1, 3)
    for round_ in range(2):
        request = Request("r", [rng.randrange(4) for _ in range(5)], SamplingParams(), max_model_len=512)
        finished = ["r"] if round_ else []
        for _ in range(60):
            item = ScheduledRequest(request, request.num_tokens - 1, 1, [1], max_drafts=3)
            proposer.propose(SchedulerOutput(scheduled=[item], finished_ids=finished))
            assert item.draft_token_ids == _reference_ngram(request.all_token_ids, 3, 1, 3)
            finished = []
            for _ in range(rng.randrange(1, 4)):
                request.append_token(rng.randrange(4))


@pytest.mark.parametrize("value, message", [
    ('{"method": "eagle", "num_speculative_tokens": 2}', "EAGLE heads are not supported"),
    ('{"method": "ngram"}', "needs \"method\" and \"num_speculative_tokens\""),
    ('{"method": "ngram", "num_speculative_tokens": 0}', "in [1, 16]"),
    ('{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 2}',
     "prompt_lookup_min <= prompt_lookup_max"),
    ('{"method": "draft_model", "num_speculative_tokens": 2}', "needs \"model\""),
    ('{"method": "ngram", "num_speculative_tokens": 2, "lookahead": 3}', "unknown keys ['lookahead']"),
    ("not json", "not valid JSON"),
])
def test_bad_speculative_config_names_the_problem(value, message):
    with pytest.raises(ValueError, match=None) as err:
        SpeculativeConfig.parse(value)
    assert message in str(err.value)


# -- verification ---------------------------------------------------------------------------------

def _processed_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The distribution a row samples from, in float64: temperature, top-k, top-p, softmax."""
    scaled = logits.double() / temperature
    kept = apply_top_k_top_p_min_p(scaled, torch.tensor([top_k]), torch.tensor([top_p], dtype=torch.float64),
                                   torch.tensor([0.0], dtype=torch.float64))
    return kept.softmax(-1)


def test_rejection_sampling_keeps_each_position_distributed_as_the_target():
    """One request's two verified positions, repeated over many rows of one batch: the first
    emitted token follows p_0 exactly; after an accepted first proposal, the second follows p_1."""
    torch.manual_seed(0)
    vocab, copies = 12, 40_000
    logits = torch.randn(3, vocab) * 1.5
    params = dict(temperature=0.8, top_k=6, top_p=0.9)
    p = [_processed_probs(logits[j:j + 1], **params)[0] for j in range(3)]
    # Proposals: a likely token, then an unlikely one that top-k keeps.
    first = int(p[0].argmax())
    second = int(torch.nonzero(p[1] > 0).flatten()[-1])
    requests = [make_request(**params) for _ in range(copies)]
    layout = DraftLayout(requests, [[first, second]] * copies, torch.device("cpu"))
    meta = SamplingMetadata.from_requests(layout.row_views, vocab, "cpu", {})
    out = Sampler().verify(logits.repeat(copies, 1), meta, layout)
    tokens, counts = out.token_ids, out.num_tokens
    assert counts.min() >= 1 and counts.max() <= 3
    first_counts = torch.bincount(tokens[:, 0], minlength=vocab)
    assert chi_square_p_value(first_counts, p[0]) > 1e-3
    accepted = tokens[:, 0] == first
    second_counts = torch.bincount(tokens[accepted, 1], minlength=vocab)
    assert chi_square_p_value(second_counts, p[1]) > 1e-3
    # Where the first proposal was rejected, nothing follows it.
    assert (counts[~accepted] == 1).all()


def test_greedy_verification_accepts_exactly_the_matching_prefix():
    torch.manual_seed(1)
    vocab = 20
    logits = torch.randn(12, vocab)
    best = logits.argmax(-1).tolist()
    # Three requests with 3, 0 and 5 proposals: the rows of each, in order.
    drafts = [[best[0], best[1], (best[2] + 1) % vocab], [], [best[5], best[6], best[7], best[8], best[9]]]
    requests = [make_request(temperature=0.0) for _ in drafts]
    layout = DraftLayout(requests, drafts, torch.device("cpu"))
    meta = SamplingMetadata.from_requests(layout.row_views, vocab, "cpu", {})
    out = Sampler().verify(logits[:layout.num_rows], meta, layout)
    assert layout.emitted(out) == [best[0:3], [best[4]], best[5:11]]


@pytest.mark.parametrize("params, expected", [
    ({"temperature": 0.0}, True),
    ({"temperature": 0.0, "min_tokens": 2}, True),  # two tokens out already: nothing blocked
    ({"temperature": 0.8}, False),
    ({"temperature": 0.0, "logprobs": 1}, False),
    ({"temperature": 0.0, "repetition_penalty": 1.3}, False),
    ({"temperature": 0.0, "frequency_penalty": 0.5}, False),
    ({"temperature": 0.0, "presence_penalty": 0.5}, False),
    ({"temperature": 0.0, "logit_bias": {3: 2.0}}, False),
    ({"temperature": 0.0, "min_tokens": 5}, False),  # EOS still blocked
])
def test_verification_skips_sampling_settings_only_for_plain_argmax(params, expected):
    """The engine's verification takes each row's argmax with no sampling settings only for
    requests where nothing changes or reports the logits; the others go through the sampler."""
    assert argmax_only(make_request(output=(5, 6), **params)) is expected


def test_greedy_rows_stay_greedy_beside_sampled_rows():
    torch.manual_seed(2)
    vocab = 16
    logits = torch.randn(8, vocab)
    best = logits.argmax(-1).tolist()
    drafts = [[best[0], (best[1] + 1) % vocab], [3, 4, 5, 6]]
    requests = [make_request(temperature=0.0), make_request(temperature=1.0, top_k=4, seed=11)]
    layout = DraftLayout(requests, drafts, torch.device("cpu"))
    mixed = Sampler().verify(logits, SamplingMetadata.from_requests(layout.row_views, vocab, "cpu", {}), layout)
    assert mixed.num_tokens[0].item() == 2 and mixed.token_ids[0, :2].tolist() == [best[0], best[1]]
    # The seeded row draws from its own generator: the same tokens alone as beside the greedy one.
    alone_layout = DraftLayout(requests[1:], drafts[1:], torch.device("cpu"))
    alone = Sampler().verify(logits[3:], SamplingMetadata.from_requests(alone_layout.row_views, vocab, "cpu", {}),
                             alone_layout)
    assert mixed.token_ids[1].tolist() == alone.token_ids[0].tolist()


def test_penalties_see_the_proposals_before_each_position():
    """Row j of a request is penalised as if proposals 1..j were already output."""
    vocab = 10
    logits = torch.zeros(3, vocab)
    logits[:, 3] = 1.0  # token 3 is the argmax until a penalty pushes it below 0
    request = make_request(temperature=0.0, frequency_penalty=2.0)
    layout = DraftLayout([request], [[3, 3]], torch.device("cpu"))
    meta = SamplingMetadata.from_requests(layout.row_views, vocab, "cpu", {})
    out = Sampler().verify(logits, meta, layout)
    # Row 0: no 3 yet, argmax 3 = proposal accepted; row 1: one 3 seen (1 - 2 < 0), argmax 0: rejected.
    assert layout.emitted(out) == [[3, 0]]


# -- end to end -------------------------------------------------------------------------------------

def test_failing_proposals_back_off_and_one_accepted_token_brings_them_back():
    """A request whose proposals are all rejected gets room for them on ever fewer steps (so
    verifying wrong proposals costs a bounded share of its steps); after one is accepted it gets
    room on every step again."""
    sched = Scheduler(KVCacheManager(1024, 4, True), 4, 64, "fcfs", num_speculative_tokens=4)
    sched.add_request(Request("r", list(range(8)), SamplingParams(max_tokens=4000, ignore_eos=True),
                              max_model_len=4096))
    proposing_steps: list[int] = []
    accept_from, steps = 1000, 1200
    for step in range(steps):
        out = sched.schedule()
        (item,) = out.scheduled
        tokens = [7]
        if item.max_drafts:
            item.set_drafts([3] * item.max_drafts)
            proposing_steps.append(step)
            if step >= accept_from:
                tokens = [3] * item.max_drafts + [7]
        sched.update(out, {"r": tokens})
    failing = [s for s in proposing_steps if s < accept_from]
    # Wait doubles after each failure, up to 63 steps: about log2(64) tries, then one in 64.
    assert 6 <= len(failing) <= 8 + (accept_from - 128) // 64 + 1
    assert max(b - a for a, b in zip(failing, failing[1:])) == 64
    first_accepted = next(s for s in proposing_steps if s >= accept_from)
    assert first_accepted - accept_from <= 64
    assert proposing_steps[-(steps - first_accepted):] == list(range(first_accepted, steps))


def test_chained_steps_back_off_as_host_steps_do():
    """In a chain each step is launched before the one ahead of it is read back, so the step
    after a miss proposes too; its miss is the same run of failures, not another: the pauses
    between tries are the host path's (0, 1, 3, ... 63 steps), each try followed by the step
    launched before its miss was known. An accepted proposal ends a pause at once."""
    sched = Scheduler(KVCacheManager(1024, 4, True), 4, 64, "fcfs", num_speculative_tokens=4)
    sched.add_request(Request("r", list(range(8)), SamplingParams(max_tokens=4000, ignore_eos=True),
                              max_model_len=4096))
    out = sched.schedule()
    sched.update(out, {"r": [7]})
    out = sched.schedule()
    proposing_steps: list[int] = []
    accept_at, steps, accepting = 400, 480, False
    for step in range(steps):
        following = sched.chain(out, 4096)
        (item,) = out.scheduled
        assert following is not None and following.scheduled[0].chained
        proposals = [3] * item.max_drafts
        if item.chained:
            item.resolve(proposals)
        else:
            item.set_drafts(proposals)
        tokens = [7]
        if proposals:
            # From accept_at, accepted from a step launched before its predecessor's miss was known.
            accepting = accepting or step >= accept_at and proposing_steps[-1] == step - 1
            proposing_steps.append(step)
            if accepting:
                tokens = proposals + [7]
        sched.update(out, {"r": tokens})
        out = following
    gaps = [b - a for a, b in zip(proposing_steps, proposing_steps[1:])]
    failing = [gap for gap, step in zip(gaps, proposing_steps[1:]) if step < accept_at]
    expected = [1] + [gap for misses in range(1, 12) for gap in (min(2 ** (misses - 1), 64), 1)]
    assert failing == expected[:len(failing)] and len(failing) >= 15
    first_accepted = next(b for a, b in zip(proposing_steps, proposing_steps[1:]) if b >= accept_at and b == a + 1)
    # The step after it was chained while the pause held: the one after that proposes, and every later one.
    assert proposing_steps[proposing_steps.index(first_accepted) + 1:] == list(range(first_accepted + 2, steps))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    built = {}

    def get(arch: str):
        if arch not in built:
            built[arch] = make_tiny_checkpoint(tmp_path_factory.mktemp(arch), arch)
        return built[arch]
    return get


def _repetitive_prompts(count: int, seed: int = 0) -> list[list[int]]:
    """Prompts that repeat themselves (so n-gram lookup proposes), of varied lengths."""
    rng = random.Random(seed)
    prompts = []
    for i in range(count):
        base = [rng.randrange(6, 300) for _ in range(rng.randrange(3, 30))]
        prompts.append((base * 3)[:len(base) * 2 + i % 5])
    return prompts


def _run_with_arrivals(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> dict[str, list[int]]:
    """Requests join the engine two at a time between steps; token ids per request."""
    engine = llm.engine
    pending = list(enumerate(prompts))
    tokens: dict[str, list[int]] = {}
    while pending or engine.has_unfinished_requests():
        for index, prompt in pending[:2]:
            engine.add_request(f"r{index}", prompt, params)
            tokens[f"r{index}"] = []
        pending = pending[2:]
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
    return tokens


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_output_is_unchanged_by_ngram_proposals(arch, checkpoints):
    """Chunked prefill (16-token budget), preemption (a cache for a third of the requests) and
    requests arriving while others decode."""
    path = checkpoints(arch)
    prompts = _repetitive_prompts(12)
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    options = dict(kv_cache_memory=12 * 2 * 2 * 2 * 16 * 16 * 4, max_model_len=160, max_num_batched_tokens=16,
                   block_size=16)
    plain = _run_with_arrivals(LLM(str(path), **options), prompts, params)
    spec_llm = LLM(str(path), speculative_config=NGRAM, **options)
    spec = _run_with_arrivals(spec_llm, prompts, params)
    assert spec == plain
    stats = spec_llm.engine.stats()
    assert stats.num_preemptions > 0 and stats.spec_num_drafts > 0
    assert stats.spec_num_accepted_tokens > 0, "no proposal was accepted: verification of accepted ones is untested"


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_output_is_unchanged_by_a_draft_model(arch, checkpoints, tmp_path):
    """A one-layer random draft of the same family (mostly rejected), then the target as its own
    draft: every proposal accepted, which holds only if the draft's K/V follows each request
    through chunks, prefix-cache hits, preemptions and rejections."""
    path = checkpoints(arch)
    draft = make_tiny_checkpoint(tmp_path, arch, num_hidden_layers=1, seed=5)
    prompts = _repetitive_prompts(8, seed=1)
    prompts += [prompts[0] + [9], prompts[1] + [9]]  # arriving last: their prefixes are cached
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    options = dict(kv_cache_memory=10 * 2 * 2 * 2 * 16 * 16 * 4, max_model_len=128, max_num_batched_tokens=16)
    plain = _run_with_arrivals(LLM(str(path), **options), prompts, params)
    options["kv_cache_memory"] *= 2  # the draft's K/V shares the budget: as many blocks for the target as a draft
    for model in (draft, path):
        spec_llm = LLM(str(path), speculative_config={"method": "draft_model", "model": str(model),
                                                      "num_speculative_tokens": 3}, **options)
        assert _run_with_arrivals(spec_llm, prompts, params) == plain
        stats = spec_llm.engine.stats()
        assert stats.spec_num_drafts > 0
    assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0
    assert stats.spec_num_accepted_tokens == stats.spec_num_draft_tokens


def test_embedded_model_greedy_is_unchanged_by_proposals():
    """The real model: n-gram lookup on a copying task, and the model as its own draft."""
    from runtime.loader.source import embedded_model_path

    messages = [{"role": "user", "content": COPY_TASK}]
    params = SamplingParams(temperature=0.0, max_tokens=64)
    options = dict(kv_cache_memory="64MiB", max_model_len=512, max_num_batched_tokens=64)
    plain = LLM(**options).chat(messages, params, use_tqdm=False)[0].outputs[0]
    ngram = LLM(speculative_config=NGRAM, **options)
    assert ngram.chat(messages, params, use_tqdm=False)[0].outputs[0].token_ids == plain.token_ids
    assert ngram.engine.stats().spec_num_accepted_tokens > 20  # the copy was found in the prompt
    self_draft = LLM(speculative_config={"method": "draft_model", "model": str(embedded_model_path()),
                                         "num_speculative_tokens": 4}, **options)
    assert self_draft.chat(messages, params, use_tqdm=False)[0].outputs[0].token_ids == plain.token_ids


def test_a_draft_model_with_another_tokenizer_is_refused(checkpoints):
    from runtime.loader.source import embedded_model_path

    with pytest.raises(ValueError, match="must share the target's vocabulary"):
        LLM(str(checkpoints("llama")), kv_cache_memory="8MiB", max_model_len=128,
            speculative_config={"method": "draft_model", "model": str(embedded_model_path()),
                                "num_speculative_tokens": 2})


class ReferenceProposer:
    """Proposals made from each request's known reference continuation."""

    def __init__(self, reference: dict[str, list[int]], prompt_lens: dict[str, int]):
        self.reference, self.prompt_lens = reference, prompt_lens

    def proposing(self, out: SchedulerOutput):
        """(item, request id, output tokens so far, the reference's next tokens) of each request with room."""
        for item in out.scheduled:
            if item.max_drafts:
                rid = item.request.request_id
                done = item.request.num_tokens - self.prompt_lens[rid]
                yield item, rid, done, self.reference[rid][done:done + item.max_drafts]


class OracleProposer(ReferenceProposer):
    """Proposes the reference continuation, corrupted after a random number of tokens: every
    acceptance length occurs, and how many tokens each step must accept is known."""

    def __init__(self, reference: dict[str, list[int]], prompts: dict[str, int]):
        super().__init__(reference, prompts)
        self.expected_accepts: list[int] = []

    def propose(self, out: SchedulerOutput) -> None:
        for item, rid, done, truth in self.proposing(out):
            # Seeded by the request and its progress: the same proposals whatever the batch order.
            good = random.Random(f"{rid}-{done}").randrange(len(truth) + 1)
            drafts = truth[:good] + [(t + 1) % 300 for t in truth[good:]]
            item.set_drafts(drafts)
            self.expected_accepts.append(good)


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_oracle_proposals_accept_the_matching_prefix_and_keep_logprobs(temperature, checkpoints):
    """Greedy: each step accepts exactly the correct part of the proposal and outputs, logprobs
    included, equal a run without proposals. Seeded sampling: reproducible with proposals."""
    path = checkpoints("llama")
    prompts = _repetitive_prompts(6, seed=3)
    params = [SamplingParams(temperature=temperature, max_tokens=24, ignore_eos=True, logprobs=3, seed=i)
              for i in range(len(prompts))]
    options = dict(kv_cache_memory="8MiB", max_model_len=160)
    reference = LLM(str(path), **options).generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    ref_tokens = {f"{i}": list(o.outputs[0].token_ids) for i, o in enumerate(reference)}

    spec = LLM(str(path), speculative_config={"method": "ngram", "num_speculative_tokens": 5}, **options)
    oracle = OracleProposer(ref_tokens, {f"{i}": len(p) for i, p in enumerate(prompts)})
    spec.engine.proposer = oracle
    engine = spec.engine
    for i, prompt in enumerate(prompts):
        engine.add_request(f"{i}", prompt, params[i])
    tokens = {f"{i}": [] for i in range(len(prompts))}
    logprobs = {f"{i}": [] for i in range(len(prompts))}
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
            logprobs[out.request_id] += out.new_logprobs or []
    stats = engine.stats()
    if temperature == 0.0:
        assert tokens == ref_tokens
        assert stats.spec_num_accepted_tokens == sum(oracle.expected_accepts)
        assert len(set(oracle.expected_accepts)) >= 4  # acceptance lengths 0 .. k occurred
        for i, out in enumerate(reference):
            for step, entry in enumerate(out.outputs[0].logprobs):
                ids, values, _ = logprobs[f"{i}"][step]
                assert ids[1:] == list(entry)[:3]
                assert values[0] == pytest.approx(entry[ids[0]].logprob, abs=1e-4)
    else:
        again = LLM(str(path), speculative_config={"method": "ngram", "num_speculative_tokens": 5}, **options)
        again.engine.proposer = OracleProposer(ref_tokens, {f"{i}": len(p) for i, p in enumerate(prompts)})
        for i in reversed(range(len(prompts))):  # another order: seeded requests do not depend on it
            again.engine.add_request(f"{i}", prompts[i], params[i])
        repeat = {f"{i}": [] for i in range(len(prompts))}
        while again.engine.has_unfinished_requests():
            for out in again.engine.step():
                repeat[out.request_id] += out.new_token_ids
        assert repeat == tokens
        assert all(len(t) == 24 for t in tokens.values())


def test_sampled_sequences_keep_their_distribution(tmp_path):
    """Three-token continuations at temperature 1 with top-k and top-p, 3000 samples with proposals
    (the greedy token after the first sampled one, often accepted) and 3000 without: a two-sample
    chi-square test."""
    path = make_tiny_checkpoint(tmp_path, "llama", vocab_size=24, initializer_range=0.3)
    prompt = [7, 8, 9, 7, 8]
    params = SamplingParams(temperature=1.0, top_k=6, top_p=0.95, max_tokens=3, ignore_eos=True, n=3000)
    plain = LLM(str(path), kv_cache_memory="16MiB", max_model_len=64, max_num_seqs=512, seed=1)
    without = plain.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0].outputs
    spec = LLM(str(path), kv_cache_memory="16MiB", max_model_len=64, max_num_seqs=512, seed=2,
               speculative_config={"method": "ngram", "num_speculative_tokens": 2})

    class Greedy:
        """Proposes the argmax after the sampled first token (the first decode step has room for one)."""

        def propose(self, out):
            for item in out.scheduled:
                if item.max_drafts:
                    item.set_drafts([int(logits_after[item.request.all_token_ids[-1]])][:item.max_drafts])

    plain_engine = LLM(str(path), kv_cache_memory="4MiB", max_model_len=64)
    continuations = plain_engine.generate([{"prompt_token_ids": prompt + [t]} for t in range(24)],
                                          SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
    logits_after = {t: o.outputs[0].token_ids[0] for t, o in enumerate(continuations)}

    spec.engine.proposer = Greedy()
    with_spec = spec.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0].outputs
    assert spec.engine.stats().spec_num_accepted_tokens > 300  # proposals were often accepted
    cells: dict[tuple, list[int]] = {}
    for index, outputs in enumerate((without, with_spec)):
        for o in outputs:
            cells.setdefault(tuple(o.token_ids), [0, 0])[index] += 1
    table = torch.tensor([c for c in cells.values() if sum(c) >= 10], dtype=torch.float64)
    rest = torch.tensor([[sum(c[0] for c in cells.values() if sum(c) < 10),
                          sum(c[1] for c in cells.values() if sum(c) < 10)]], dtype=torch.float64)
    table = torch.cat([table, rest]) if rest.sum() > 0 else table
    expected = table.sum(1, keepdim=True) * table.sum(0, keepdim=True) / table.sum()
    stat = ((table - expected) ** 2 / expected).sum()
    dof = table.shape[0] - 1
    p_value = float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat / 2))
    assert p_value > 1e-3, f"distributions differ (chi-square {float(stat):.1f} on {dof} dof)"


class WrongThenRightProposer(ReferenceProposer):
    """Proposes the reference continuation with every token changed (all rejected) until a
    request has ``switch`` output tokens, then the reference itself (all accepted)."""

    def __init__(self, reference: dict[str, list[int]], prompt_lens: dict[str, int], switch: int):
        super().__init__(reference, prompt_lens)
        self.switch = switch
        self.proposing_steps: dict[str, list[int]] = {rid: [] for rid in reference}

    def propose(self, out: SchedulerOutput) -> None:
        for item, rid, done, truth in self.proposing(out):
            self.proposing_steps[rid].append(done)
            item.set_drafts(truth if done >= self.switch else [(t + 1) % 300 for t in truth])


def test_failing_proposals_back_off_in_the_engine_and_output_is_unchanged(checkpoints):
    """Engine-level back-off: over 40 output tokens of wrong proposals a request verifies
    proposals on its decode steps after 1, 2, 4, 8, 16, 32 tokens only (2^(z-1) - 1 steps of pause
    after z failures), so zero acceptance costs a handful of wide steps; once proposals turn
    right, the next proposing step accepts them and proposals return on every step. Greedy
    output equals the output without proposals throughout."""
    path = checkpoints("llama")
    prompts = _repetitive_prompts(2, seed=9)
    params = SamplingParams(temperature=0.0, max_tokens=80, ignore_eos=True)
    options = dict(kv_cache_memory="8MiB", max_model_len=160)
    reference = LLM(str(path), **options).generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    ref_tokens = {f"{i}": list(o.outputs[0].token_ids) for i, o in enumerate(reference)}
    spec = LLM(str(path), speculative_config={"method": "ngram", "num_speculative_tokens": 4}, **options)
    proposer = WrongThenRightProposer(ref_tokens, {f"{i}": len(p) for i, p in enumerate(prompts)}, switch=40)
    spec.engine.proposer = proposer
    for i, prompt in enumerate(prompts):
        spec.engine.add_request(f"{i}", prompt, params)
    tokens = {f"{i}": [] for i in range(len(prompts))}
    while spec.engine.has_unfinished_requests():
        for out in spec.engine.step():
            tokens[out.request_id] += out.new_token_ids
    assert tokens == ref_tokens
    for steps in proposer.proposing_steps.values():
        wrong = [done for done in steps if done < 40]
        assert wrong == [1, 2, 4, 8, 16, 32]
        right = [done for done in steps if done >= 40]
        assert right[0] == 64  # the pause after the 6th failure (31 steps) ran out
        # From then on every step proposes and accepts all 4: 5 tokens a step, up to max_tokens.
        assert right == [64, 69, 74]

def test_kv_cache_after_rejections_holds_the_accepted_tokens(checkpoints):
    """When a request finishes, the K/V of every position it computed equals a run without
    proposals (rejected proposals' slots were written again with the accepted tokens)."""
    path = checkpoints("qwen3")
    prompts = _repetitive_prompts(4, seed=5)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)

    def cache_at_finish(llm: LLM) -> dict[str, torch.Tensor]:
        engine = llm.engine
        kv, seen = engine.kv_manager, {}
        free = kv.free

        def recording_free(request):
            blocks = torch.tensor(kv.block_ids(request.request_id))
            positions = torch.arange(request.num_computed_tokens)
            slots = blocks[positions // engine.block_size] * engine.block_size + positions % engine.block_size
            # [2 (K, V), blocks, block_size, heads, dim]: the contract's default layout.
            seen[request.request_id] = torch.stack([cache.flatten(1, 2)[:, slots] for cache in engine.runner.kv_caches])
            free(request)

        kv.free = recording_free
        for i, prompt in enumerate(prompts):
            engine.add_request(f"{i}", prompt, params)
        while engine.has_unfinished_requests():
            engine.step()
        return seen

    options = dict(kv_cache_memory="8MiB", max_model_len=160)
    plain = cache_at_finish(LLM(str(path), **options))
    spec_llm = LLM(str(path), speculative_config=NGRAM, **options)
    spec = cache_at_finish(spec_llm)
    assert spec_llm.engine.stats().spec_num_draft_tokens > spec_llm.engine.stats().spec_num_accepted_tokens > 0
    for rid, values in plain.items():
        assert spec[rid].shape == values.shape
        torch.testing.assert_close(spec[rid], values, rtol=1e-4, atol=1e-5)


def test_oracle_proposals_under_penalties_and_bias_match_without_proposals(checkpoints, monkeypatch):
    """Greedy requests whose logits are changed (penalties, logit bias) are verified through the
    sampler, each row seeing the proposals before it as output: with every decode step verifying
    (no back-off) the right continuation and some wrong tokens after it, outputs equal a run
    without proposals. The settings change those outputs, so verifying on the raw argmax would
    be caught."""
    monkeypatch.setattr(Request, "MAX_PROPOSAL_PAUSE", 0)
    path = checkpoints("llama")
    prompts = _repetitive_prompts(4, seed=5)
    changed = [dict(repetition_penalty=1.5), dict(frequency_penalty=2.0, presence_penalty=2.0),
               dict(logit_bias={prompts[2][-1]: 4.0, prompts[2][-2]: 4.0})]
    params = [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, **extra) for extra in changed]
    options = dict(kv_cache_memory="8MiB", max_model_len=160)
    plain = LLM(str(path), **options)
    requests = [{"prompt_token_ids": p} for p in prompts[:len(params)]]
    reference = plain.generate(requests, params, use_tqdm=False)
    raw = plain.generate(requests, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    ref_tokens = {f"{i}": list(o.outputs[0].token_ids) for i, o in enumerate(reference)}
    assert all(ref_tokens[f"{i}"] != list(o.outputs[0].token_ids) for i, o in enumerate(raw))

    spec = LLM(str(path), speculative_config={"method": "ngram", "num_speculative_tokens": 4}, **options)
    spec.engine.proposer = OracleProposer(ref_tokens, {f"{i}": len(p) for i, p in enumerate(prompts)})
    tokens = {f"{i}": [] for i in range(len(requests))}
    for i, request in enumerate(requests):  # one at a time: each setting decides its own steps' path
        spec.engine.add_request(f"{i}", request["prompt_token_ids"], params[i])
        while spec.engine.has_unfinished_requests():
            for out in spec.engine.step():
                tokens[out.request_id] += out.new_token_ids
    assert tokens == ref_tokens
    assert spec.engine.stats().spec_num_accepted_tokens > 0


def test_stop_strings_and_penalties_match_without_proposals(checkpoints):
    path = checkpoints("llama")
    prompts = [{"prompt_token_ids": p} for p in _repetitive_prompts(6, seed=7)]
    options = dict(kv_cache_memory="8MiB", max_model_len=160)
    plain = LLM(str(path), **options)
    first = plain.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
                           use_tqdm=False)[0].outputs[0].text
    stop = first[len(first) // 2:len(first) // 2 + 2] or "a"
    params = [SamplingParams(temperature=0, max_tokens=30, stop=[stop], ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=30, repetition_penalty=1.3, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=30, frequency_penalty=0.8, presence_penalty=0.4, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=30, min_tokens=10, stop_token_ids=[prompts[3]["prompt_token_ids"][0]]),
              SamplingParams(temperature=0, max_tokens=7, logprobs=2),
              SamplingParams(temperature=0, max_tokens=30, prompt_logprobs=1)]
    spec = LLM(str(path), speculative_config=NGRAM, **options)
    for ours, ref in zip(spec.generate(prompts, params, use_tqdm=False), plain.generate(prompts, params, use_tqdm=False)):
        assert ours.outputs[0].text == ref.outputs[0].text
        assert ours.outputs[0].finish_reason == ref.outputs[0].finish_reason
        assert list(ours.outputs[0].token_ids) == list(ref.outputs[0].token_ids)
    assert spec.engine.stats().spec_num_drafts > 0


def test_streams_through_the_engine_process_carry_several_tokens_a_step(checkpoints):
    """The serving path (engine core process, messages, output processor): streamed deltas add up
    to the offline result with proposals, stop strings and logprobs included."""
    import asyncio

    from runtime.engine.args import EngineArgs
    from runtime.engine.async_engine import AsyncEngine

    path = str(checkpoints("llama"))
    prompt = [5, 6, 7, 8, 9] * 6
    options = dict(kv_cache_memory="8MiB", max_model_len=160, speculative_config=NGRAM)
    offline = LLM(path, **options)
    text = offline.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
                            use_tqdm=False)[0].outputs[0].text
    params = [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=1),
              SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[text[8:11]])]
    expected = offline.generate([{"prompt_token_ids": prompt}] * 2, params, use_tqdm=False)

    async def run():
        engine = await AsyncEngine(EngineArgs(model=path, **options)).start()
        try:
            await engine.wait_ready(120)
            results = []
            for i, p in enumerate(params):
                deltas, tokens, final = "", [], None
                async for out in engine.add_request(f"r{i}", None, prompt, p):
                    deltas += out.outputs[0].delta_text
                    tokens += out.outputs[0].delta_token_ids
                    final = out.outputs[0]
                results.append((deltas, tokens, final))
            return results, engine.stats()
        finally:
            await engine.shutdown()

    results, stats = asyncio.run(run())
    assert stats.spec_num_accepted_tokens > 0
    for (deltas, tokens, final), ref in zip(results, expected):
        assert deltas == final.text == ref.outputs[0].text
        assert tokens == list(ref.outputs[0].token_ids)
        assert final.finish_reason == ref.outputs[0].finish_reason
    assert results[1][2].finish_reason == "stop" and len(results[1][1]) < 24


def test_tensor_parallel_ranks_verify_the_same_proposals(checkpoints):
    path = str(checkpoints("qwen3"))
    prompts = [{"prompt_token_ids": p} for p in _repetitive_prompts(6, seed=9)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    options = dict(kv_cache_memory="8MiB", max_model_len=160)
    plain = [o.outputs[0].token_ids for o in LLM(path, **options).generate(prompts, params, use_tqdm=False)]
    parallel = LLM(path, tensor_parallel_size=2, speculative_config=NGRAM, **options)
    try:
        ours = [o.outputs[0].token_ids for o in parallel.generate(prompts, params, use_tqdm=False)]
        assert parallel.engine.stats().spec_num_accepted_tokens > 0
    finally:
        parallel.engine.shutdown()
    assert ours == plain
