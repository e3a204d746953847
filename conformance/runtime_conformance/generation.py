"""Driving an EngineCore on token ids, and comparing greedy generations with the reference's."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

from runtime.engine.core import EngineCore
from runtime.sample.params import SamplingParams

_request_ids = itertools.count()


@dataclass
class Generation:
    tokens: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] = field(default_factory=list)
    """Per generated token: the logprobs of it and of the top candidates."""


def generate(engine: EngineCore, prompts: list[list[int]], params: list[SamplingParams]) -> list[Generation]:
    """Run the prompts together, step by step, until all finish; outputs in prompt order."""
    ids = [f"conformance-{next(_request_ids)}" for _ in prompts]
    results = {rid: Generation() for rid in ids}
    for rid, prompt, p in zip(ids, prompts, params):
        engine.add_request(rid, prompt, p)
    while engine.has_unfinished_requests():
        for out in engine.step():
            results[out.request_id].tokens += out.new_token_ids
            for token_ids, logprobs, _ in out.new_logprobs or []:
                results[out.request_id].logprobs.append(dict(zip(token_ids, logprobs)))
    return [results[rid] for rid in ids]


def greedy_differences(got: list[Generation], expected: list[Generation], tolerance: float) -> list[str]:
    """Where greedy generations disagree beyond numerical noise.

    Equal tokens must have logprobs within ``tolerance``. A different token is accepted only at
    a near-tie (the reference's logprobs of the two within ``tolerance``); after it the
    sequences legitimately diverge and are not compared further.
    """
    problems = []
    for index, (ours, ref) in enumerate(zip(got, expected)):
        if len(ours.tokens) != len(ref.tokens):
            problems.append(f"prompt {index}: {len(ours.tokens)} tokens generated, reference {len(ref.tokens)}")
        for step, (token, ref_token) in enumerate(zip(ours.tokens, ref.tokens)):
            row = ref.logprobs[step]
            if token == ref_token:
                if abs(ours.logprobs[step][token] - row[token]) > tolerance:
                    problems.append(f"prompt {index} token {step}: logprob {ours.logprobs[step][token]:.4f} of token "
                                    f"{token}, reference {row[token]:.4f}")
                    break
                continue
            if row[ref_token] - row.get(token, -math.inf) > tolerance:
                problems.append(f"prompt {index} token {step}: generated {token}, reference {ref_token} (reference "
                                f"logprobs {row[ref_token]:.4f} vs {row.get(token, -math.inf):.4f}); tokens so far "
                                f"{ours.tokens[:step]}")
            break
    return problems
