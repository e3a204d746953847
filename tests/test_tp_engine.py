"""Tensor and pipeline parallelism end to end: an engine whose ranks are worker processes (gloo)
generates what a one-rank engine generates, token for token, through chunked prefill,
preemption and prefix caching, with pipeline micro-batches in flight; a worker killed
mid-generation ends the engine with an error naming its rank."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

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
        params = [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2, prompt_logprobs=1),
                  SamplingParams(temperature=0.8, seed=11, max_tokens=16, ignore_eos=True)]
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], [params[i % 2] for i in range(len(PROMPTS))],
                            use_tqdm=False)
        return [o.outputs[0] for o in outs], llm.engine.scheduler.num_preemptions
    finally:
        llm.engine.shutdown()


# 12 blocks of 16 tokens (layers x K and V x KV heads x 16 dims x 4 bytes a token, counting a
# rank's layers and KV heads; --kv-cache-memory is per rank): four sequences of up to 69 tokens
# need 20, so some are preempted and resumed. The 1-KV-head model replicates its head on both
# tensor-parallel ranks; the others split 2. A pipeline stage holds 1 of the 2 layers.
@pytest.mark.parametrize("arch,overrides,tp,pp,block_bytes", [
    ("llama", {"num_key_value_heads": 1}, 2, 1, (4096, 4096)),
    ("qwen3", {}, 2, 1, (8192, 4096)),
    ("gemma2", {}, 1, 2, (8192, 4096)),
    ("llama", {"num_key_value_heads": 1}, 2, 2, (4096, 2048)),
], ids=["tp2-kv1", "tp2", "pp2", "tp2xpp2-kv1"])
def test_a_parallel_engine_generates_what_one_rank_does(arch, overrides, tp, pp, block_bytes, tmp_path):
    path = make_tiny_checkpoint(tmp_path, arch, **overrides)
    alone, _ = generate(path, kv_cache_memory=12 * block_bytes[0], **SMALL)
    together, preemptions = generate(path, tensor_parallel_size=tp, pipeline_parallel_size=pp,
                                     kv_cache_memory=12 * block_bytes[1], **SMALL)
    assert preemptions > 0  # the small cache forced some: resumption is covered
    for a, b in zip(alone, together):
        assert b.token_ids == a.token_ids
        if a.logprobs is not None:
            assert [list(e) for e in b.logprobs] == [list(e) for e in a.logprobs]
            assert [lp.logprob for e in b.logprobs for lp in e.values()] == pytest.approx(
                [lp.logprob for e in a.logprobs for lp in e.values()], abs=1e-4)


def test_pipeline_stages_keep_micro_batches_in_flight(tmp_path):
    """With two stages the engine core launches a second micro-batch (other requests) before
    reading back the first."""
    path = make_tiny_checkpoint(tmp_path, "llama")
    llm = LLM(str(path), pipeline_parallel_size=2, kv_cache_memory="4MiB", max_model_len=128, max_num_batched_tokens=16)
    engine, depths = llm.engine, []
    collect = engine.executor.collect

    def collect_noting_depth(pending):
        depths.append(len(engine._micro_batches) + 1)
        return collect(pending)

    engine.executor.collect = collect_noting_depth
    try:
        outs = llm.generate([{"prompt_token_ids": [3 + i] * 10} for i in range(6)],
                            SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
        assert all(len(o.outputs[0].token_ids) == 8 for o in outs)
        assert max(depths) == 2 and depths.count(2) > len(depths) // 2
    finally:
        llm.engine.shutdown()


FAULTS = {
    # A worker killed is seen at once; one that stops answering without dying (SIGSTOP) makes the
    # collectives wait out --distributed-timeout, then rank 0 names it from its missing heartbeat.
    "killed": (signal.SIGKILL, 30, r"worker rank 1 \(pid \d+\) exited with code -9"),
    # 10 s, not less: the same timeout bounds start-up collectives, which a loaded 2-core CI machine can slow past 5 s.
    "stalled": (signal.SIGSTOP, 10, r"worker rank 1 stopped responding \(no heartbeat\)"),
}


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("parallel", [dict(tensor_parallel_size=2), dict(pipeline_parallel_size=2)], ids=["tp2", "pp2"])
def test_a_failed_worker_is_named_and_the_engine_fails_within_the_timeout(parallel, fault, tmp_path):
    sig, timeout, message = FAULTS[fault]
    path = make_tiny_checkpoint(tmp_path, "llama")
    llm = LLM(str(path), distributed_timeout=timeout, kv_cache_memory="16MiB", max_model_len=256, **parallel)
    executor = llm.engine.executor
    worker = executor._workers[0]
    launch, launches = executor.launch, []

    def launch_then_fail(*args, **kwargs):
        launches.append(1)
        if len(launches) == 10:  # mid-generation
            os.kill(worker.pid, sig)
        return launch(*args, **kwargs)

    executor.launch = launch_then_fail
    try:
        started = time.monotonic()
        with pytest.raises(RuntimeError, match=message):
            outs = llm.generate([{"prompt_token_ids": [5, 6, 7]}] * 4, SamplingParams(max_tokens=200, ignore_eos=True),
                                use_tqdm=False)
            # Seen once in a full suite (not reproduced since): say what happened if it comes back.
            pytest.fail(f"generate finished after {len(launches)} launches with "
                        f"{[len(o.outputs[0].token_ids) for o in outs]} tokens; rank 1: {_process_state(worker.pid)}")
        assert len(launches) >= 10 and time.monotonic() - started < timeout + 20
    finally:
        llm.engine.shutdown()
    assert not worker.is_alive()


def _process_state(pid: int) -> str:
    """The kernel's one-letter state of ``pid`` (T: stopped), or why it cannot be read."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError as exc:
        return f"unreadable ({exc})"


def test_a_step_during_which_a_rank_died_gives_no_tokens(tmp_path):
    """A rank noticed dead while rank 0 waits for a step (NCCL's collectives are then aborted, and
    the step ends with whatever they left): the step's tokens are not returned, the rank is named."""
    path = make_tiny_checkpoint(tmp_path, "llama")
    llm = LLM(str(path), tensor_parallel_size=2, kv_cache_memory="16MiB", max_model_len=128)
    executor = llm.engine.executor
    collect = executor.driver.collect

    def collect_as_rank_1_dies(pending):
        result = collect(pending)
        executor._failure = "worker rank 1 (pid 4321) exited with code -9"
        return result

    executor.driver.collect = collect_as_rank_1_dies
    try:
        # One token: the step is the request's last, so no later step would notice the failure.
        with pytest.raises(RuntimeError, match=r"worker rank 1 \(pid 4321\) exited with code -9"):
            llm.generate([{"prompt_token_ids": PROMPTS[1]}], SamplingParams(max_tokens=1), use_tqdm=False)
    finally:
        llm.engine.shutdown()


def test_a_worker_stopped_while_rank_0_waits_for_a_step_is_named_after_the_timeout(tmp_path):
    """Rank 0 waiting on a device for a step whose collectives wait on a stopped worker (NCCL's,
    replayed from a CUDA graph, never time out): the watcher names the worker once the wait passes
    --distributed-timeout and aborts the collectives, which ends the wait (here a stand-in for it)."""
    timeout = 3
    path = make_tiny_checkpoint(tmp_path, "llama")
    llm = LLM(str(path), tensor_parallel_size=2, kv_cache_memory="16MiB", max_model_len=128,
              distributed_timeout=timeout)
    executor = llm.engine.executor
    worker, collect, calls = executor._workers[0], executor.driver.collect, []

    def collect_waiting_on_a_stopped_worker(pending):
        calls.append(1)
        if len(calls) == 5:
            os.kill(worker.pid, signal.SIGSTOP)
            stopped = time.monotonic()
            while executor._failure is None and time.monotonic() - stopped < 30:  # until aborted
                time.sleep(0.05)
        return collect(pending)

    executor.driver.collect = collect_waiting_on_a_stopped_worker
    try:
        started = time.monotonic()
        with pytest.raises(RuntimeError, match=r"worker rank 1 stopped responding \(no heartbeat\)"):
            llm.generate([{"prompt_token_ids": [5, 6, 7]}] * 2, SamplingParams(max_tokens=50, ignore_eos=True),
                         use_tqdm=False)
        assert time.monotonic() - started < timeout + 10
    finally:
        llm.engine.shutdown()


def test_an_engine_whose_rendezvous_failed_leaves_the_next_one_in_this_process_working(tmp_path, monkeypatch):
    """A worker gone before the process group forms fails the engine, naming it; torch's group
    counter in this process must not stay one ahead of the next engine's fresh workers."""
    from runtime.worker.executor import MultiprocExecutor

    path = make_tiny_checkpoint(tmp_path, "llama")
    await_workers = MultiprocExecutor._await_workers

    def await_then_lose_a_worker(self, timeout_s):
        await_workers(self, timeout_s)
        self._workers[0].kill()

    monkeypatch.setattr(MultiprocExecutor, "_await_workers", await_then_lose_a_worker)
    with pytest.raises(RuntimeError, match=r"worker rank 1 \(pid \d+\) exited with code -9"):
        LLM(str(path), distributed_timeout=3, kv_cache_memory="16MiB", max_model_len=128, tensor_parallel_size=2)
    monkeypatch.undo()
    llm = LLM(str(path), kv_cache_memory="16MiB", max_model_len=128, distributed_timeout=60, tensor_parallel_size=2)
    try:
        [out] = llm.generate([{"prompt_token_ids": PROMPTS[1]}], SamplingParams(max_tokens=8, ignore_eos=True),
                             use_tqdm=False)
        assert len(out.outputs[0].token_ids) == 8
    finally:
        llm.engine.shutdown()


def test_the_ray_executor_generates_what_mp_does(tmp_path):
    ray = pytest.importorskip("ray", reason="the ray extra is not installed")
    path = make_tiny_checkpoint(tmp_path, "llama")
    splits = [dict(tensor_parallel_size=2), dict(pipeline_parallel_size=2)]
    by_mp = [generate(path, kv_cache_memory="16MiB", max_model_len=128, **split)[0] for split in splits]
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        by_ray = [generate(path, distributed_executor_backend="ray", kv_cache_memory="16MiB", max_model_len=128,
                           **split)[0] for split in splits]
    finally:
        ray.shutdown()
    for ray_outputs, mp_outputs in zip(by_ray, by_mp):
        assert [o.token_ids for o in ray_outputs] == [o.token_ids for o in mp_outputs]
