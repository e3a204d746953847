"""Running a request alone and mixed into a busy engine, for the deterministic-mode tests and benchmark.

``run_schedule`` drives an ``EngineCore`` step by step, adding each request at the step it
arrives; ``mixed_jobs`` puts the target requests among random other requests (some sharing a
target's prompt prefix, so prefix-cache hits reuse KV computed in another batch) arriving at
random steps.
"""

from __future__ import annotations

import random

from runtime import SamplingParams

Job = tuple[int, str, list[int], SamplingParams]
"""(arrival step, request id, prompt token ids, sampling parameters)."""


def run_schedule(core, jobs: list[Job]) -> dict[str, tuple[list[int], list]]:
    """Each request's (tokens, logprobs) once every job has arrived and finished."""
    results: dict[str, tuple[list[int], list]] = {}
    pending = sorted(jobs, key=lambda job: job[0])
    step = 0
    while pending or core.has_unfinished_requests():
        while pending and pending[0][0] <= step:
            _, request_id, prompt, params = pending.pop(0)
            core.add_request(request_id, prompt, params)
        for output in core.step():
            tokens, logprobs = results.setdefault(output.request_id, ([], []))
            tokens.extend(output.new_token_ids)
            logprobs.extend(output.new_logprobs or [])
        step += 1
    return results


def targets(rng: random.Random, vocab: int, sampled: int, greedy: int, max_tokens: int) -> list[Job]:
    """Seeded sampled requests (temperature, top-k, top-p) and greedy ones, with logprobs, all arriving at step 0."""
    jobs = []
    for i in range(sampled + greedy):
        params = (SamplingParams(temperature=0.9, top_k=40, top_p=0.9, seed=1000 + i, max_tokens=max_tokens,
                                 ignore_eos=True, logprobs=3) if i < sampled
                  else SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=3))
        prompt = [rng.randrange(10, vocab) for _ in range(rng.randrange(4, 70))]
        jobs.append((0, f"target-{i}", prompt, params))
    return jobs


def mixed_jobs(rng: random.Random, vocab: int, target_jobs: list[Job], others: int, last_step: int) -> list[Job]:
    """The targets at random steps among ``others`` random requests, a third of which start with a target's prompt."""
    jobs = [(rng.randrange(0, last_step), rid, prompt, params) for _, rid, prompt, params in target_jobs]
    for i in range(others):
        prompt = [rng.randrange(10, vocab) for _ in range(rng.randrange(1, 90))]
        if i % 3 == 0:
            prompt = rng.choice(target_jobs)[2][:rng.randrange(1, 40)] + prompt
        params = SamplingParams(temperature=1.0, max_tokens=rng.randrange(1, 16), ignore_eos=True)
        jobs.append((rng.randrange(0, last_step), f"other-{i}", prompt, params))
    return jobs
