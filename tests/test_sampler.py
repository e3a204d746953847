"""Sampler tests against per-row references written out directly (plain Python / float64)."""

from __future__ import annotations

import itertools
import math
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from runtime.platform.reference import apply_top_k_top_p_min_p
from runtime.sample.params import SamplingParams
from runtime.sample.sampler import (RecentRowColumns, Sampler, SamplingMetadata, _apply_bias_and_penalties, row_columns,
                                    top_logprobs)
from runtime.sched.request import Request

EOS = 2
_ids = itertools.count()


def make_request(prompt=(1, 3, 4), output=(), eos=frozenset({EOS}), request_id=None, **params) -> Request:
    params.setdefault("max_tokens", 100)
    return Request(request_id or f"r{next(_ids)}", list(prompt), SamplingParams(**params),
                   eos_token_ids=eos, output_token_ids=list(output))


def sample(logits: torch.Tensor, requests: list[Request], generators=None):
    meta = SamplingMetadata.from_requests(requests, logits.shape[-1], "cpu", {} if generators is None else generators)
    return Sampler()(logits, meta)


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's test of observed counts against expected probabilities (cells with p > 0)."""
    n = counts.sum().double()
    cells = probs > 0
    expected = probs[cells].double() * n
    stat = ((counts[cells].double() - expected) ** 2 / expected).sum()
    dof = int(cells.sum()) - 1
    # Survival function of chi-square(dof) = regularized upper incomplete gamma Q(dof/2, stat/2).
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat / 2))


def test_greedy_rows_take_argmax_in_mixed_batch():
    torch.manual_seed(0)
    logits = torch.randn(6, 100)
    requests = [make_request(temperature=0.0 if i % 2 == 0 else 1.0) for i in range(6)]
    out = sample(logits, requests)
    assert torch.equal(out.token_ids[0::2], logits[0::2].argmax(-1))
    assert out.logprobs is None and out.logprob_token_ids is None and out.sampled_ranks is None

    all_greedy = sample(logits, [make_request(temperature=0.0, top_k=3) for _ in range(6)])
    assert torch.equal(all_greedy.token_ids, logits.argmax(-1))


def test_recent_row_columns_reuse_a_copy_only_for_the_same_settings():
    """A batch with the settings of a recent one gets that batch's tensors; a params object changed
    in place, or other rows, get a fresh copy with the values of now (row_columns' values)."""
    recent = RecentRowColumns(size=2)
    greedy, warm = SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, top_k=5, top_p=0.9, min_p=0.1)
    first = recent.columns([greedy, warm], torch.device("cpu"))
    assert recent.columns([SamplingParams(temperature=0.0), warm], torch.device("cpu")) is first
    warm.temperature = 1.3
    changed = recent.columns([greedy, warm], torch.device("cpu"))
    assert changed is not first
    for name, column in row_columns([greedy, warm], torch.device("cpu")).items():
        assert torch.equal(changed[name], column), name
    recent.columns([warm], torch.device("cpu"))  # two more batches: the first one's copy is gone
    recent.columns([greedy], torch.device("cpu"))
    warm.temperature = 0.7
    assert recent.columns([greedy, warm], torch.device("cpu")) is not first


def test_caller_logits_left_unchanged():
    torch.manual_seed(0)
    logits = torch.randn(3, 30)
    before = logits.clone()
    requests = [make_request(output=[5, 5], temperature=0.8, top_p=0.5, repetition_penalty=1.5,
                             frequency_penalty=1.0, logit_bias={3: 5.0}, logprobs=2) for _ in range(3)]
    sample(logits, requests)
    assert torch.equal(logits, before)


def test_seeded_request_same_tokens_alone_and_in_any_batch():
    torch.manual_seed(0)
    vocab, steps = 64, 6
    target_logits = [torch.randn(vocab) * 0.5 for _ in range(steps)]

    def run(position: int, batch_size: int, seed: int = 1234) -> list[int]:
        generators: dict[str, torch.Generator] = {}
        tokens = []
        for step in range(steps):
            requests = [make_request(temperature=1.0, seed=(7 if i == 0 else None)) for i in range(batch_size)]
            requests[position] = make_request(request_id="target", temperature=1.0, seed=seed)
            logits = torch.randn(batch_size, vocab)
            logits[position] = target_logits[step]
            tokens.append(int(sample(logits, requests, generators).token_ids[position]))
        assert "target" in generators
        return tokens

    alone = run(0, 1)
    assert run(1, 4) == alone
    assert run(3, 5) == alone
    assert run(0, 1, seed=99) != alone


# (temperature, top_k, top_p, min_p): each filter alone, then all three together.
TRUNCATION_CASES = [(1.0, 3, 1.0, 0.0), (0.8, 0, 0.7, 0.0), (1.3, 0, 1.0, 0.1), (0.9, 5, 0.8, 0.05)]


def reference_allowed(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float):
    """Tokens kept and their renormalized probabilities, as vLLM orders the filters: top-k on the
    temperature-scaled distribution, top-p on what top-k left (renormalised), min-p relative to the max."""
    probs = (logits.double() / temperature).softmax(-1).tolist()
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    keep = set(order[:top_k]) if top_k > 0 else set(order)
    if top_p < 1.0:
        nucleus, total = set(), 0.0
        kept_mass = sum(probs[i] for i in keep)
        for i in (i for i in order if i in keep):
            nucleus.add(i)
            total += probs[i] / kept_mass
            assert abs(total - top_p) > 1e-4, "test logits sit on a top-p boundary"
            if total >= top_p:
                break
        keep &= nucleus
    keep &= {i for i, p in enumerate(probs) if p >= min_p * max(probs)}
    mass = sum(probs[i] for i in keep)
    return {i: probs[i] / mass for i in keep}


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", TRUNCATION_CASES)
def test_top_k_top_p_min_p_keep_exactly_the_reference_set(temperature, top_k, top_p, min_p):
    torch.manual_seed(1)
    vocab, draws = 12, 4000
    row = torch.randn(vocab) * 2
    allowed = reference_allowed(row, temperature, top_k, top_p, min_p)
    requests = [make_request(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p) for _ in range(draws)]
    tokens = sample(row.expand(draws, vocab).clone(), requests).token_ids
    seen = set(tokens.tolist())
    assert seen <= set(allowed)
    assert {i for i, p in allowed.items() if p > 0.01} <= seen
    expected = torch.zeros(vocab, dtype=torch.float64)
    for i, p in allowed.items():
        expected[i] = p
    assert chi_square_p_value(torch.bincount(tokens, minlength=vocab), expected) > 1e-3


def test_penalties_match_per_row_reference():
    torch.manual_seed(2)
    vocab = 20
    rows = [  # (prompt, output, repetition, frequency, presence)
        ([1, 4, 4, 9], [4, 7, 7, 7, 12], 1.3, 0.0, 0.0),
        ([1, 4], [3, 3, 5], 1.0, 0.5, 0.3),
        ([0, 6, 19], [6, 6, 8, 19], 0.7, -0.4, 1.1),
        ([2, 3], [], 1.0, 0.0, 0.0),
        ([], [11], 2.0, 1.5, -2.0),
    ]
    logits = torch.randn(len(rows), vocab) * 3
    requests = [make_request(prompt=p, output=o, repetition_penalty=r, frequency_penalty=f, presence_penalty=pr)
                for p, o, r, f, pr in rows]
    meta = SamplingMetadata.from_requests(requests, vocab, "cpu", {})
    processed = logits.clone()
    _apply_bias_and_penalties(processed, meta)

    expected = logits.clone().double()
    for b, (prompt, output, rep, freq, presence) in enumerate(rows):
        for t in range(vocab):
            x = float(logits[b, t])
            if t in prompt or t in output:
                x = x / rep if x > 0 else x * rep
            count = output.count(t)
            expected[b, t] = x - count * freq - (count > 0) * presence
    torch.testing.assert_close(processed.double(), expected, rtol=1e-6, atol=1e-5)


def test_no_penalty_tensors_when_no_row_needs_them():
    meta = SamplingMetadata.from_requests([make_request(output=[1, 1]), make_request(temperature=0.0)], 10, "cpu", {})
    assert meta.output_token_counts is None and meta.prompt_token_mask is None
    assert meta.repetition_penalties is None and meta.frequency_penalties is None
    assert meta.logit_bias is None and meta.min_tokens_blocked is None

    only_presence = SamplingMetadata.from_requests([make_request(output=[1], presence_penalty=0.5)], 10, "cpu", {})
    assert only_presence.output_token_counts is not None and only_presence.prompt_token_mask is None


def test_logit_bias():
    torch.manual_seed(3)
    logits = torch.randn(3, 16)
    best = logits.argmax(-1)
    requests = [
        make_request(temperature=0.0, logit_bias={5: 100.0}),
        make_request(temperature=0.0, logit_bias={int(best[1]): -100.0}),
        make_request(temperature=0.0, logit_bias={int(best[2]): 0.5, 10**6: 3.0}),  # out-of-vocab id ignored
    ]
    tokens = sample(logits, requests).token_ids
    assert tokens[0] == 5
    assert tokens[1] == logits[1].topk(2).indices[1]
    assert tokens[2] == best[2]

    draws = 2000
    banned = sample(logits[0].expand(draws, 16).clone(),
                    [make_request(logit_bias={int(best[0]): -100.0}) for _ in range(draws)]).token_ids
    assert int(best[0]) not in banned.tolist()


def test_min_tokens_blocks_eos_and_stop_tokens():
    vocab = 10
    logits = torch.zeros(vocab)
    logits[EOS], logits[7], logits[4] = 10.0, 9.0, 8.0

    def greedy(output, **params) -> int:
        request = make_request(output=output, temperature=0.0, stop_token_ids=[7], **params)
        return int(sample(logits.unsqueeze(0), [request]).token_ids[0])

    assert greedy([5], min_tokens=3) == 4
    assert greedy([5], min_tokens=3, ignore_eos=True) == EOS  # ignore_eos: EOS is not a stop to hold back
    assert greedy([5, 5, 5], min_tokens=3) == EOS

    draws = 2000
    requests = [make_request(output=[5], min_tokens=2, stop_token_ids=[7]) for _ in range(draws)]
    tokens = sample(logits.expand(draws, vocab).clone(), requests).token_ids.tolist()
    assert EOS not in tokens and 7 not in tokens


@pytest.mark.parametrize("seeded", [False, True])
def test_temperature_sampling_distribution(seeded):
    """20k draws (5k distinct seeds for the per-row generator path) vs softmax(logits / T)."""
    torch.manual_seed(4)
    vocab, temperature = 10, 0.7
    draws = 5000 if seeded else 20000
    row = torch.randn(vocab) * 1.5
    requests = [make_request(temperature=temperature, seed=(i if seeded else None)) for i in range(draws)]
    tokens = sample(row.expand(draws, vocab).clone(), requests).token_ids
    expected = (row.double() / temperature).softmax(-1)
    assert chi_square_p_value(torch.bincount(tokens, minlength=vocab), expected) > 1e-3


def test_logprobs_are_raw_log_softmax_with_ranks():
    torch.manual_seed(5)
    vocab = 50
    logits = torch.randn(4, vocab) * 2
    requests = [
        make_request(temperature=0.0, logprobs=3, logit_bias={0: 30.0}),
        make_request(temperature=1.5, logprobs=5, repetition_penalty=1.8, output=[1, 2, 3]),
        make_request(temperature=0.9, top_k=10, logprobs=0),
        make_request(temperature=1.0),
    ]
    out = sample(logits, requests)
    raw = logits.double().log_softmax(-1)
    k = 5
    assert out.logprobs.shape == out.logprob_token_ids.shape == (4, k + 1)
    assert torch.equal(out.logprob_token_ids[:, 0], out.token_ids)
    assert out.token_ids[0] == 0  # the bias moved the choice; logprobs still describe the raw logits
    for b in range(4):
        ids = out.logprob_token_ids[b].tolist()
        torch.testing.assert_close(out.logprobs[b].double(), raw[b, ids], rtol=0, atol=1e-5)
        assert ids[1:] == raw[b].argsort(descending=True)[:k].tolist()
        sampled = raw[b, out.token_ids[b]]
        assert int(out.sampled_ranks[b]) == 1 + sum(1 for v in raw[b].tolist() if v > float(sampled) + 1e-9)
    assert int(out.sampled_ranks[0]) > 1 or int(raw[0].argmax()) == 0


def test_logprobs_from_half_precision_logits():
    torch.manual_seed(6)
    logits = torch.randn(2, 40).to(torch.bfloat16)
    out = sample(logits, [make_request(temperature=0.0, logprobs=2), make_request(logprobs=1)])
    assert out.logprobs.dtype == torch.float32
    torch.testing.assert_close(out.logprobs[0, 0], logits[0].float().log_softmax(-1).max())
    assert math.isclose(float(out.logprobs[0].exp()[1:].sum()), float(logits[0].float().softmax(-1).topk(2).values.sum()), rel_tol=1e-5)


def test_top_logprobs_break_ties_by_token_id_like_a_stable_sort():
    """Rows full of equal values (bfloat16 logits tie often): the list is a stable descending
    sort's first k, whatever k, and the values are topk's."""
    g = torch.Generator().manual_seed(0)
    for _ in range(100):
        rows = (torch.randn(6, 64, generator=g) * 2).round() / 4
        rows[0, :9] = float("-inf")
        k = int(torch.randint(0, 65, (), generator=g))
        values, ids = top_logprobs(rows, k)
        expected_values, expected_ids = rows.sort(dim=-1, descending=True, stable=True)
        assert torch.equal(values, expected_values[:, :k]) and torch.equal(ids, expected_ids[:, :k])


class _LiveBytes(TorchDispatchMode):
    """The most bytes of the tensors ops made inside the mode alive at once (a tensor counts until
    the op's output object is gone, its views' storage shared with it)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._held: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self._held:
                ptr, size = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
                self._held.add(ptr)
                self.live += size
                weakref.finalize(t, self._free, ptr, size)
        self.peak = max(self.peak, self.live)
        return out

    def _free(self, ptr: int, size: int) -> None:
        self._held.discard(ptr)
        self.live -= size


def test_top_k_top_p_holds_few_full_size_temporaries():
    """The engine reserves a full batch's worst-case sampling beside the KV cache (256 rows over
    a 151,936-token vocabulary: 148 MiB a [rows, vocab] float32 tensor): the truncation keeps at
    most five of them alive at once, its result included (it held eleven and a half before)."""
    rows, vocab = 64, 4096
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(0))
    tracker = _LiveBytes()
    with tracker:
        apply_top_k_top_p_min_p(logits, torch.full((rows,), 50), torch.full((rows,), 0.9), torch.full((rows,), 0.05))
    assert tracker.peak <= 5.5 * rows * vocab * 4
