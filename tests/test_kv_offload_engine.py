"""KV offload and preemption by swap end to end, on a tiny Llama whose KV cache is too small for
its workload: the outputs equal those of the same engine without a host tier (greedy and
seeded sampling), and prefix hits served from the host are counted.

The CPU platform shares memory between host and device, where the host tier is a no-op; these
tests lift its ``unified_memory`` flag so the CPU exercises the same code as a GPU would.
"""

from __future__ import annotations

import random

import pytest

from runtime import LLM, SamplingParams
from runtime_cpu.platform import CpuPlatform

from tiny_models import make_tiny_checkpoint

BLOCK_BYTES = 2 * 2 * 4 * 2 * 16 * 4
"""One block of the tiny Llama: 2 layers x K/V x 4 tokens x 2 KV heads x head size 16 x 4 bytes."""
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=0)
SEEDED = SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=8, ignore_eos=True, logprobs=0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), "llama"))


@pytest.fixture
def host_tier(monkeypatch):
    monkeypatch.setattr(CpuPlatform, "unified_memory", False)


def engine(checkpoint, num_blocks: int, **options) -> LLM:
    return LLM(checkpoint, dtype="float32", block_size=4, max_model_len=64, kv_cache_memory=num_blocks * BLOCK_BYTES,
               **options)


def generate(llm: LLM, prompts, params) -> list[list[int]]:
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [Completion(o.outputs[0]) for o in outputs]


class Completion:
    """Tokens, and their logprobs to within float32 rounding of another batch composition: a
    slightly wrong KV block can leave a tiny model's tokens unchanged, not its logprobs."""

    def __init__(self, output) -> None:
        self.tokens = list(output.token_ids)
        self.logprobs = [entry[token].logprob for token, entry in zip(output.token_ids, output.logprobs)]

    def __eq__(self, other) -> bool:
        return self.tokens == other.tokens and all(abs(a - b) < 1e-4 for a, b in zip(self.logprobs, other.logprobs))

    def __repr__(self) -> str:
        return f"Completion({self.tokens}, {[round(lp, 5) for lp in self.logprobs]})"


def shared_prefix_rounds(vocab: int) -> list[list[list[int]]]:
    """Three rounds: prompts on prefix A, then others (evicting A from the device), then on A again."""
    rng = random.Random(0)
    draw = lambda n: [rng.randrange(6, vocab) for _ in range(n)]  # noqa: E731
    a = draw(24)
    return [[a + draw(3), a + draw(5)], [draw(28), draw(26)], [a + draw(6), a + draw(1)]]


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_offloaded_prefixes_come_back_from_the_host_with_the_same_outputs(checkpoint, host_tier, params):
    offload = engine(checkpoint, 20, kv_offloading_size=64 * BLOCK_BYTES / (1 << 30))
    plain = engine(checkpoint, 20)
    rounds = shared_prefix_rounds(offload.engine.runner.settings.vocab_size)
    for prompts in rounds:
        assert generate(offload, prompts, params) == generate(plain, prompts, params)
    kv, plain_kv = offload.engine.kv_manager, plain.engine.kv_manager
    assert offload.engine.runner.num_host_blocks == 64 and plain_kv.host is None
    # Round 3 finds prefix A's blocks that round 2 evicted from the device on the host; without
    # the host tier they are computed again.
    assert kv.cpu_prefix_cache_hits >= 16
    assert kv.prefix_cache_hits + kv.cpu_prefix_cache_hits >= plain_kv.prefix_cache_hits + 16
    assert kv.usage == 0.0


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_swapped_requests_resume_with_the_outputs_of_an_unpreempted_run(checkpoint, host_tier, params):
    rng = random.Random(1)
    prompts = [[rng.randrange(6, 96) for _ in range(n)] for n in (30, 22, 27, 18)]
    roomy = generate(engine(checkpoint, 200), prompts, params)
    swap = engine(checkpoint, 18, kv_offloading_size=64 * BLOCK_BYTES / (1 << 30), preemption_mode="swap")
    assert generate(swap, prompts, params) == roomy
    scheduler = swap.engine.scheduler
    assert scheduler.num_swaps > 0 and scheduler.num_swaps == scheduler.num_preemptions
    recompute = engine(checkpoint, 18)
    assert generate(recompute, prompts, params) == roomy
    assert recompute.engine.scheduler.num_preemptions > 0 and recompute.engine.scheduler.num_swaps == 0
    assert swap.engine.kv_manager.host.num_held == 0


def test_unified_memory_makes_the_host_tier_a_noop(checkpoint):
    llm = engine(checkpoint, 20, kv_offloading_size=0.001, preemption_mode="swap")
    assert llm.engine.runner.num_host_blocks == 0 and llm.engine.kv_manager.host is None
    assert llm.engine.scheduler.preemption_mode == "recompute"


def test_a_host_tier_smaller_than_a_block_is_refused(checkpoint, host_tier):
    with pytest.raises(ValueError, match="holds no KV block"):
        engine(checkpoint, 20, kv_offloading_size=1e-9)
