"""Sampling padded to a static-shape bucket (``runtime.sample.static_shapes``) against the plain
sampler: every real row samples the same token, logprobs and rank whatever the padding, the
seeded rows' random streams included; padding rows and padded widths change nothing."""

from __future__ import annotations

import itertools

import pytest
import torch

from runtime.sample.params import SamplingParams
from runtime.sample.sampler import Sampler, SamplingMetadata
from runtime.sample.static_shapes import full_grammar_mask, power_of_two_at_least, static_sampling_metadata
from runtime.sched.request import Request

VOCAB = 96
EOS = 2
_ids = itertools.count()


def request(output=(), prompt=(1, 3, 4, 9), **params) -> Request:
    params.setdefault("max_tokens", 100)
    return Request(f"s{next(_ids)}", list(prompt), SamplingParams(**params), eos_token_ids=frozenset({EOS}),
                   output_token_ids=list(output))


def mixed_batch() -> list[Request]:
    """Every feature group a step can carry, each random row seeded (so both samplers draw the same noise)."""
    return [
        request(temperature=0.0),
        request(temperature=0.9, seed=1, top_k=7, logprobs=3),
        request(temperature=1.3, seed=2, top_p=0.6, min_p=0.05, output=[5, 5, 8]),
        request(temperature=0.7, seed=3, repetition_penalty=1.4, frequency_penalty=0.5, presence_penalty=0.3,
                output=[5, 7, 7, 11, 12]),
        request(temperature=1.0, seed=4, logit_bias={6: 4.0, 40: -3.0}, min_tokens=4, stop_token_ids=[17],
                output=[1]),
        request(temperature=0.0, logprobs=0, min_tokens=2, stop_token_ids=[30, 31]),
    ]


def rows_equal(plain, padded, requests: list[Request]) -> None:
    n = len(requests)
    assert torch.equal(padded.token_ids[:n], plain.token_ids)
    k = max(r.sampling_params.logprobs or 0 for r in requests)
    for row, r in enumerate(requests):
        if r.sampling_params.logprobs is None:
            continue
        width = r.sampling_params.logprobs + 1
        assert torch.equal(padded.logprob_token_ids[row, :width], plain.logprob_token_ids[row, :width])
        assert torch.equal(padded.logprobs[row, :width], plain.logprobs[row, :width])
        assert int(padded.sampled_ranks[row]) == int(plain.sampled_ranks[row])
    assert plain.logprobs.shape[1] == k + 1


@pytest.mark.parametrize("rows", [6, 8, 16])
def test_padded_sampling_equals_plain_sampler_step_after_step(rows):
    requests = mixed_batch()
    plain_generators, padded_generators = {}, {}
    sampler = Sampler()
    generator = torch.Generator().manual_seed(rows)
    for step in range(4):
        logits = torch.randn(rows, VOCAB, generator=generator) * 3
        plain = sampler(logits[:len(requests)],
                        SamplingMetadata.from_requests(requests, VOCAB, "cpu", plain_generators))
        meta = static_sampling_metadata(requests, rows, VOCAB, "cpu", padded_generators)
        padded = sampler(logits, meta)
        assert padded.token_ids.shape == (rows,)
        rows_equal(plain, padded, requests)
        for r, token in zip(requests, plain.token_ids.tolist()):
            r.output_token_ids.append(token)  # penalties and min_tokens move with the outputs


def test_padded_shapes_follow_the_bucket_not_the_requests():
    """Two different batches of one bucket give metadata of the same shapes and structure."""
    small = [request(temperature=0.0), request(temperature=0.8, seed=5, logit_bias={3: 1.0})]
    large = [request(temperature=0.5, top_k=3, logit_bias={3: 1.0, 4: 2.0}) for _ in range(5)]
    shapes = []
    for batch in (small, large):
        meta = static_sampling_metadata(batch, 8, VOCAB, "cpu", {})
        assert (meta.all_greedy, meta.all_random, meta.needs_top_k_top_p_min_p) == (False, False, True)
        shapes.append([tuple(t.shape) for t in (meta.temperature, meta.greedy, meta.top_k, meta.top_p, meta.min_p)]
                      + [len(meta.generators)])
    assert shapes[0] == shapes[1] == [(8,)] * 5 + [8]


def test_widths_are_powers_of_two():
    batch = [request(temperature=0.0, logprobs=5, repetition_penalty=1.2, output=list(range(3, 12)))]
    meta = static_sampling_metadata(batch, 2, VOCAB, "cpu", {})
    assert meta.max_num_logprobs == 8
    assert meta.output_token_counts.shape == meta.prompt_token_mask.shape == (2, VOCAB)
    assert [power_of_two_at_least(n) for n in (0, 1, 2, 3, 5, 16, 17)] == [1, 1, 2, 4, 8, 16, 32]


def test_too_many_rows_for_the_bucket_is_refused():
    with pytest.raises(ValueError, match="do not fit the sequence bucket 2"):
        static_sampling_metadata([request() for _ in range(3)], 2, VOCAB, "cpu", {})


def test_full_grammar_mask_equals_the_rows_given():
    """Rows a grammar does not constrain get all bits set: the same logits as masking only its rows."""
    generator = torch.Generator().manual_seed(0)
    words = (VOCAB + 31) // 32
    bitmask = torch.randint(-2 ** 31, 2 ** 31 - 1, (2, words), generator=generator, dtype=torch.int32)
    logits = torch.randn(8, VOCAB, generator=generator)
    from runtime.platform.reference import apply_token_bitmask
    expected = apply_token_bitmask(logits.clone(), bitmask, torch.tensor([1, 4]))
    full, rows = full_grammar_mask([1, 4], bitmask, 8, torch.device("cpu"))
    assert torch.equal(apply_token_bitmask(logits.clone(), full, rows), expected)
    assert torch.isinf(expected[[1, 4]]).any() and not torch.isinf(expected[[0, 2, 3, 5, 6, 7]]).any()
