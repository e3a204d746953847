"""The decode-graph path (padded batches, persistent input buffers, replay) on the CPU.

A test platform says it supports graphs and "captures" by keeping the closure: a replay reruns
the captured forward on the captured batch object, whose tensors are the runner's persistent
buffers. So it sees exactly what a CUDA graph would: the inputs each step copied in, padded to
the captured size, with the capture's metadata (the reference attention reads only tensors).
Greedy outputs must equal the eager CPU engine's, which tests/test_models.py checks against HF.

Graphs also turn on look-ahead (the next decode step launched before this one's tokens are read
back), so the same comparisons check it: every output, stop, abort and seeded draw must be what
the same engine produces without look-ahead.
"""

from __future__ import annotations

import pytest
import torch

from runtime.engine.args import EngineArgs
from runtime.engine.core import EngineCore
from runtime.platform import Registry, hookimpl
from runtime.platform.reference import ReferenceAttentionBackend
from runtime.sample.params import SamplingParams
from runtime.worker.decode_graphs import capture_sizes
from runtime_cpu.platform import CpuPlatform
from tiny_models import make_tiny_checkpoint


class ReplayCpuPlatform(CpuPlatform):
    name = "replay_cpu"
    priority = -1
    supports_graphs = True
    replays = 0

    def graph_pool(self):
        return None

    def capture_graph(self, fn, pool):
        static = fn().clone()

        def replay():
            ReplayCpuPlatform.replays += 1
            static.copy_(fn())

        return replay, static


class ReplayBackend(ReferenceAttentionBackend):
    name = "replay_reference"
    platform = "replay_cpu"


class ReplayPlugin:
    RUNTIME_CONTRACT = ">=1.1,<2"

    @hookimpl
    def runtime_platforms(self):
        return [ReplayCpuPlatform]

    @hookimpl
    def runtime_attention_backends(self):
        return [ReplayBackend]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("graphs"), "llama")


def _registry() -> Registry:
    registry = Registry(entry_points=[])
    registry.register(ReplayPlugin(), "replay")
    return registry


def _run(engine: EngineCore, prompts: list[list[int]], max_tokens: list[int], **params) -> dict[str, list]:
    """Staggered arrivals, so steps mix prefill with decode and decode batches change size.
    Returns each request's tokens, then its finish reason (and logprobs when asked)."""
    outputs: dict[str, list] = {}
    pending = list(enumerate(prompts))
    params = {"temperature": 0.0, "ignore_eos": True} | params
    while pending or engine.has_unfinished_requests():
        if pending:
            i, prompt = pending.pop(0)
            engine.add_request(str(i), prompt, SamplingParams(max_tokens=max_tokens[i], **params))
        for out in engine.step():
            outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.new_logprobs:
                outputs[out.request_id].append(out.new_logprobs)
            if out.finish_reason:
                outputs[out.request_id].append((out.finish_reason, out.stop_reason))
    return outputs


def _count_look_aheads(engine: EngineCore) -> list[int]:
    made = [0]
    look_ahead = engine.scheduler.look_ahead

    def counted(output):
        following = look_ahead(output)
        made[0] += following is not None
        return following

    engine.scheduler.look_ahead = counted
    return made


def test_capture_sizes_ladder():
    assert capture_sizes(1) == [1]
    assert capture_sizes(3) == [1, 2, 4]
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 24]
    assert capture_sizes(10_000)[-1] == 512


def test_graph_replays_match_eager(checkpoint):
    prompts = [[5 + i, 17, 23 + 2 * i, 9][: 2 + i % 3] * (1 + i) for i in range(7)]
    max_tokens = [12, 3, 9, 14, 5, 11, 7]
    common = dict(model=str(checkpoint), device="replay_cpu", max_num_seqs=6, max_model_len=96,
                  kv_cache_memory="4MiB", max_num_batched_tokens=64)
    graphs = EngineCore(EngineArgs(**common), registry=_registry())
    assert graphs.runner.decode_graphs is not None and graphs.runner.decode_graphs.sizes == [1, 2, 4, 8]
    before = ReplayCpuPlatform.replays
    look_aheads = _count_look_aheads(graphs)
    with_graphs = _run(graphs, prompts, max_tokens)
    assert ReplayCpuPlatform.replays - before >= 8  # the pure-decode steps went through a replay
    assert look_aheads[0] > 0  # once nothing waits, decode steps were launched ahead

    eager = EngineCore(EngineArgs(**common, enforce_eager=True), registry=_registry())
    assert eager.runner.decode_graphs is None
    assert with_graphs == _run(eager, prompts, max_tokens)
    assert all(len(with_graphs[str(i)]) == max_tokens[i] + 1 for i in range(len(prompts)))
    assert not graphs.has_unfinished_requests() and graphs.kv_manager.usage == 0


COMMON = dict(device="replay_cpu", max_num_seqs=6, max_model_len=96, kv_cache_memory="4MiB", max_num_batched_tokens=64)
PROMPTS = [[5 + i, 17, 23 + 2 * i, 9][: 2 + i % 3] * (1 + i) for i in range(5)]


def _engines(checkpoint):
    """Two engines replaying the same graphs, the first with look-ahead, the second without (so
    their logits agree to the bit, and sampling must too)."""
    ahead = EngineCore(EngineArgs(model=str(checkpoint), **COMMON), registry=_registry())
    step_by_step = EngineCore(EngineArgs(model=str(checkpoint), **COMMON), registry=_registry())
    step_by_step.look_ahead = False
    return ahead, step_by_step


def test_look_ahead_stops_where_eager_does(checkpoint):
    """A stop token the look-ahead step already ran past: the request ends at the same token,
    the extra step's token is dropped, and every block comes back."""
    ahead, eager = _engines(checkpoint)
    greedy = _run(eager, PROMPTS, [20] * 5)
    stops = sorted({tokens[6] for tokens in greedy.values()})  # each request meets one by its 7th token
    eager = _engines(checkpoint)[1]
    look_aheads = _count_look_aheads(ahead)
    stopped = _run(ahead, PROMPTS, [20] * 5, stop_token_ids=stops)
    assert stopped == _run(eager, PROMPTS, [20] * 5, stop_token_ids=stops)
    assert look_aheads[0] > 0
    assert all(out[-1][0] == "stop" and len(out) <= 8 for out in stopped.values())
    assert ahead.kv_manager.usage == 0 and not ahead.has_unfinished_requests()


def _logprobs_apart(outputs: dict[str, list]) -> tuple[dict, list[float]]:
    """The outputs with each logprob entry's values taken out, and those values in order."""
    values: list[float] = []
    kept = {}
    for rid, items in outputs.items():
        kept[rid] = []
        for item in items:
            if isinstance(item, list):  # [(token ids, logprobs, rank)]
                values += item[0][1]
                item = [(item[0][0], item[0][2])]
            kept[rid].append(item)
    return kept, values


def test_look_ahead_keeps_seeded_sampling_and_logprobs(checkpoint):
    """Every draw, top-k id and rank as without look-ahead. A look-ahead step is scheduled
    before the caller adds the next request, so batches differ by one admission between the
    two engines, and a token's logprob by float rounding (batch-shaped matmuls)."""
    ahead, eager = _engines(checkpoint)
    params = dict(temperature=0.9, top_p=0.95, seed=7, logprobs=2)
    look_aheads = _count_look_aheads(ahead)
    sampled, sampled_logprobs = _logprobs_apart(_run(ahead, PROMPTS, [9, 14, 5, 11, 8], **params))
    assert look_aheads[0] > 0
    expected, expected_logprobs = _logprobs_apart(_run(eager, PROMPTS, [9, 14, 5, 11, 8], **params))
    assert sampled == expected
    assert sampled_logprobs == pytest.approx(expected_logprobs, abs=1e-4)


def test_look_ahead_across_admissions_and_prompt_chunks(checkpoint):
    """Nine requests for six sequences, prompts longer than the 64-token step budget, all added
    at once (LLM.generate): look-ahead steps admit requests and carry prompt chunks beside
    decodes whose token is still being sampled, and every output is the step-by-step engine's."""
    ahead, step_by_step = _engines(checkpoint)
    prompts = [[(7 * i + 3 * j) % 200 + 5 for j in range(20 + 6 * i)] for i in range(9)]
    max_tokens = [6, 11, 3, 9, 14, 5, 8, 12, 4]
    launched = []
    look_ahead = ahead.scheduler.look_ahead

    def recorded(output):
        following = look_ahead(output)
        if following is not None:
            launched.append(following)
        return following

    ahead.scheduler.look_ahead = recorded

    def run(engine: EngineCore) -> dict[str, list[int]]:
        for i, prompt in enumerate(prompts):
            engine.add_request(str(i), prompt, SamplingParams(temperature=0.0, max_tokens=max_tokens[i], ignore_eos=True))
        outputs: dict[str, list[int]] = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
        return outputs

    outputs = run(ahead)
    assert outputs == run(step_by_step)
    assert all(len(outputs[str(i)]) == max_tokens[i] for i in range(len(prompts)))
    mixed = [f for f in launched if any(s.token_pending for s in f.scheduled) and any(not s.token_pending for s in f.scheduled)]
    assert any(s.start == 0 for f in mixed for s in f.scheduled)  # an admission beside pending decodes
    assert any(0 < s.start < s.request.num_prompt_tokens for f in mixed for s in f.scheduled)  # a later prompt chunk
    assert ahead.kv_manager.usage == 0 and not ahead.has_unfinished_requests()


def test_abort_during_a_look_ahead_step(checkpoint):
    results = []
    for engine in _engines(checkpoint):
        look_aheads = _count_look_aheads(engine)
        for i, prompt in enumerate(PROMPTS[:3]):
            engine.add_request(str(i), prompt, SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))
        outputs: dict[str, list[int]] = {}
        for step in range(40):
            if step == 12:
                engine.abort_requests(["1"])
            if not engine.has_unfinished_requests():
                break
            for out in engine.step():
                outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
        assert engine.kv_manager.usage == 0 and not engine.has_unfinished_requests()
        results.append((outputs, look_aheads[0]))
    (ahead, made), (eager, _) = results
    assert made > 0 and ahead == eager and len(ahead["1"]) < 30 and len(ahead["0"]) == 30


def test_padding_writes_no_kv(checkpoint):
    """A padded replay must leave every cache slot outside the real sequences untouched."""
    engine = EngineCore(EngineArgs(model=str(checkpoint), device="replay_cpu", max_num_seqs=4, max_model_len=64,
                                   kv_cache_memory="2MiB"), registry=_registry())
    for cache in engine.runner.kv_caches:
        cache.fill_(7.0)
    engine.add_request("a", [5, 6, 7], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    engine.add_request("b", [8, 9], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    engine.add_request("c", [10, 11, 12, 13], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()  # three sequences decode at the captured size 4: one padding row per step
    used = 3 + 2 + 4 + 3 * 3  # prompt tokens + the K/V written for each decode input (the last token is never fed back)
    untouched = sum(int((cache == 7.0).all(dim=-1).all(dim=-1).sum()) for cache in engine.runner.kv_caches)
    layers = len(engine.runner.kv_caches)
    total_slots = engine.num_blocks * engine.block_size * 2 * layers
    assert untouched == total_slots - 2 * layers * used
    assert not torch.isnan(engine.runner.kv_caches[0]).any()


def test_lora_steps_replay_the_graphs_with_lora_and_the_others_those_without(checkpoint, tmp_path):
    """With LoRA enabled every size is captured with and without the LoRA path. A decode step
    replays the LoRA one only when a token has an adapter, and no LoRA op runs in the other;
    outputs with and without adapters equal the eager engine's (which tests/test_lora.py checks
    against HF + PEFT)."""
    from runtime.lora import LoRARequest

    from lora_adapters import SEPARATE, make_adapter

    make_adapter(checkpoint, tmp_path / "a", 8, SEPARATE, seed=5)
    adapter = LoRARequest("a", 1, str(tmp_path / "a"))
    lora = dict(enable_lora=True, max_loras=2, max_lora_rank=8)
    graphs = EngineCore(EngineArgs(model=str(checkpoint), **COMMON, **lora), registry=_registry())
    runner = graphs.runner
    decode_graphs = runner.decode_graphs
    assert set(decode_graphs.graphs) == {(size, 1, with_lora) for size in decode_graphs.sizes for with_lora in (False, True)}
    assert runner.lora_slots.active is False
    # Make the fake graphs as frozen as CUDA graphs: a replay runs the LoRA path exactly when its
    # graph was captured with it, whatever the runner's flag says now. Count replays and LoRA calls.
    replayed, lora_calls = [], [0]
    for (size, _, with_lora), graph in decode_graphs.graphs.items():
        def replay(original=graph.replay, key=(size, with_lora)):
            replayed.append(key)
            active, runner.lora_slots.active = runner.lora_slots.active, key[1]
            try:
                original()
            finally:
                runner.lora_slots.active = active
        graph.replay = replay
    # Dense projections add their adapters through linear_lora, quantized ones through lora_add.
    for op in ("lora_add", "linear_lora"):
        def counted(*args, original=getattr(runner.ops, op)):
            lora_calls[0] += 1
            return original(*args)

        setattr(runner.ops, op, counted)

    def run(engine: EngineCore, adapters: list) -> dict[str, list[int]]:
        outputs: dict[str, list[int]] = {}
        for i, (prompt, request) in enumerate(zip(PROMPTS, adapters)):
            engine.add_request(str(i), prompt, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
                               lora_request=request)
        while engine.has_unfinished_requests():
            for out in engine.step():
                outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
        return outputs

    eager = EngineCore(EngineArgs(model=str(checkpoint), **COMMON, **lora, enforce_eager=True), registry=_registry())
    base_only = run(graphs, [None] * len(PROMPTS))
    assert replayed and not any(with_lora for _, with_lora in replayed)
    assert lora_calls[0] == 0  # no LoRA kernel in any step: prefills ran eager without it, decodes replayed without
    assert base_only == run(eager, [None] * len(PROMPTS))

    replayed.clear()
    mixed = [adapter if i % 2 == 0 else None for i in range(len(PROMPTS))]
    with_adapters = run(graphs, mixed)
    assert any(with_lora for _, with_lora in replayed) and lora_calls[0] > 0
    assert with_adapters == run(eager, mixed)
    assert with_adapters != base_only  # the adapter changed the outputs, so the comparison means something

    replayed.clear()
    assert run(graphs, [None] * len(PROMPTS)) == base_only  # back to the graphs without LoRA
    assert replayed and not any(with_lora for _, with_lora in replayed)


SMALL_CACHE = 14 * 2 * 2 * 8 * 2 * 16 * 4
"""14 blocks of 8 tokens of the tiny Llama (2 layers x K/V x 8 tokens x 2 KV heads x head size 16 x 4
bytes): room for 112 tokens where six requests grow to up to 70 each."""


def _recorded_preemptions(engine: EngineCore) -> list[int]:
    """Counts requests preempted by look-ahead steps, then by steps scheduled in turn."""
    counts = [0, 0]
    look_ahead, schedule = engine.scheduler.look_ahead, engine.scheduler.schedule

    def ahead(output):
        following = look_ahead(output)
        counts[0] += len(following.preempted_ids) if following is not None else 0
        return following

    def in_turn(*args, **kwargs):
        out = schedule(*args, **kwargs)
        counts[1] += len(out.preempted_ids)
        return out

    engine.scheduler.look_ahead, engine.scheduler.schedule = ahead, in_turn
    return counts


@pytest.mark.parametrize("preemption", ["recompute", "swap"])
def test_look_ahead_preempts_under_a_full_cache(checkpoint, preemption, monkeypatch):
    """A cache too small for six growing sequences: look-ahead steps preempt (recomputing or
    swapping the victim, which loses the token in flight for it) rather than stop at the first
    request short of a block, and every greedy output is the one a cache large enough gives."""
    prompts = [[(5 * i + 3 * j) % 150 + 5 for j in range(10 + 3 * i)] for i in range(6)]
    max_tokens = [40, 36, 44, 30, 38, 42]
    monkeypatch.setattr(CpuPlatform, "unified_memory", False)  # else the host tier is the device's memory: none
    small = dict(COMMON, kv_cache_memory=SMALL_CACHE, block_size=8, preemption_mode=preemption,
                 kv_offloading_size=0.01 if preemption == "swap" else None)
    ahead = EngineCore(EngineArgs(model=str(checkpoint), **small), registry=_registry())
    preempted = _recorded_preemptions(ahead)
    outputs = _run(ahead, prompts, max_tokens)
    assert preempted[0] > 0
    assert outputs == _run(EngineCore(EngineArgs(model=str(checkpoint), **COMMON), registry=_registry()),
                           prompts, max_tokens)
    if preemption == "swap":
        assert ahead.scheduler.num_swaps > 0
    assert ahead.kv_manager.usage == 0 and not ahead.has_unfinished_requests()


def test_look_ahead_never_preempts_a_seeded_request(checkpoint):
    """A seeded request's stream draws the token in flight: under a full cache look-ahead waits
    for the step instead of preempting it (a request not in flight it may preempt), so each
    seeded draw is the step-by-step engine's."""
    prompts = [[(5 * i + 3 * j) % 150 + 5 for j in range(10 + 3 * i)] for i in range(6)]
    max_tokens = [40, 36, 44, 30, 38, 42]
    small = dict(COMMON, kv_cache_memory=SMALL_CACHE, block_size=8)
    ahead = EngineCore(EngineArgs(model=str(checkpoint), **small), registry=_registry())
    step_by_step = EngineCore(EngineArgs(model=str(checkpoint), **small), registry=_registry())
    step_by_step.look_ahead = False
    preempted = _recorded_preemptions(ahead)
    params = dict(temperature=0.9, seed=11)
    outputs = _run(ahead, prompts, max_tokens, **params)
    assert preempted[1] > 0
    assert outputs == _run(step_by_step, prompts, max_tokens, **params)
