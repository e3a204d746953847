"""Tensor parallelism end to end: an engine whose ranks are worker processes (gloo) generates
what a one-rank engine generates, token for token, through chunked prefill, preemption and
prefix caching; a worker killed mid-generation ends the engine with an error naming its rank."""

from __future__ import annotations

import os
import signal

import pytest

from runtime import LLM, SamplingParams

from tiny_models import make_tiny_checkpoint

pytestmark = pytest.mark.xdist_group("distributed")

PROMPTS = [[5, 9, 2, 7, 11, 3, 8] * 5, [4, 4, 6], [12, 1, 10, 13, 2] * 9, [7, 3] * 20] * 2
SMALL = dict(max_model_len=128, max_num_batched_tokens=24, max_num_seqs=4)
"""A small token budget: prompts are chunked (the cache sizes below force preemptions)."""


def generate(path, **options):
    llm = LLM(str(path), **options)
    try:
        params = [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2),
                  SamplingParams(temperature=0.8, seed=11, max_tokens=16, ignore_eos=True)]
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], [params[i % 2] for i in range(len(PROMPTS))],
                            use_tqdm=False)
        return [o.outputs[0] for o in outs], llm.engine.scheduler.num_preemptions
    finally:
        llm.engine.shutdown()


# 12 blocks of 16 tokens (2 layers x K and V x a rank's KV heads x 16 dims x 4 bytes a token;
# --kv-cache-memory is per rank): four sequences of up to 69 tokens need 20, so some are
# preempted and resumed. The 1-KV-head model replicates its head on both ranks; the other splits 2.
@pytest.mark.parametrize("arch,overrides,block_bytes", [("llama", {"num_key_value_heads": 1}, (4096, 4096)),
                                                        ("qwen3", {}, (8192, 4096))])
def test_two_rank_engine_generates_what_one_rank_does(arch, overrides, block_bytes, tmp_path):
    path = make_tiny_checkpoint(tmp_path, arch, **overrides)
    alone, _ = generate(path, kv_cache_memory=12 * block_bytes[0], **SMALL)
    together, preemptions = generate(path, tensor_parallel_size=2, kv_cache_memory=12 * block_bytes[1], **SMALL)
    assert preemptions > 0  # the small cache forced some: resumption is covered
    for a, b in zip(alone, together):
        assert b.token_ids == a.token_ids
        if a.logprobs is not None:
            assert [list(e) for e in b.logprobs] == [list(e) for e in a.logprobs]
            assert [lp.logprob for e in b.logprobs for lp in e.values()] == pytest.approx(
                [lp.logprob for e in a.logprobs for lp in e.values()], abs=1e-4)


def test_a_killed_worker_is_named_and_the_engine_fails(tmp_path):
    path = make_tiny_checkpoint(tmp_path, "llama")
    llm = LLM(str(path), tensor_parallel_size=2, distributed_timeout=30, kv_cache_memory="16MiB", max_model_len=256)
    executor = llm.engine.executor
    worker = executor._workers[0]
    launch, launches = executor.launch, []

    def launch_then_kill(*args):
        launches.append(1)
        if len(launches) == 10:  # mid-generation
            os.kill(worker.pid, signal.SIGKILL)
            worker.join()
        return launch(*args)

    executor.launch = launch_then_kill
    try:
        with pytest.raises(RuntimeError, match=r"worker rank 1 \(pid \d+\) exited with code -9"):
            llm.generate([{"prompt_token_ids": [5, 6, 7]}] * 4, SamplingParams(max_tokens=200, ignore_eos=True),
                         use_tqdm=False)
        assert len(launches) >= 10
    finally:
        llm.engine.shutdown()


def test_the_ray_executor_generates_what_mp_does(tmp_path):
    ray = pytest.importorskip("ray", reason="the ray extra is not installed")
    path = make_tiny_checkpoint(tmp_path, "llama")
    options = dict(kv_cache_memory="16MiB", max_model_len=128, tensor_parallel_size=2)
    by_mp, _ = generate(path, **options)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        by_ray, _ = generate(path, distributed_executor_backend="ray", **options)
    finally:
        ray.shutdown()
    assert [o.token_ids for o in by_ray] == [o.token_ids for o in by_mp]
