"""Tensor parallelism in the model: two ranks over gloo, each holding its slice of every weight,
compute what one rank holding all of them computes (greedy tokens equal, logprobs close), for
every architecture, a GQA model with fewer KV heads than ranks, a vocabulary the ranks do not
divide, and a fused qkv checkpoint (Phi-3). Pipeline stages, each holding its layers and
handing on its output, compute what one model does."""

from __future__ import annotations


import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from runtime.models.parallel import PipelineParallel, TensorParallel, check_pipeline_parallel, check_tensor_parallel, valid_sizes
from runtime.platform import get_registry
from runtime.sample.params import SamplingParams
from runtime.sched.request import Request
from runtime.sched.scheduler import ScheduledRequest, SchedulerOutput
from runtime.worker.model_runner import ModelRunner
from runtime.loader.source import open_model

from tiny_models import make_tiny_checkpoint

pytestmark = pytest.mark.xdist_group("distributed")

PROMPTS = [[5, 9, 2, 7, 11, 3, 8], [4, 4, 6], [12, 1, 10, 13, 2]]
BLOCK = 16


def make_runner(path: str, tp: TensorParallel = TensorParallel(), pp: PipelineParallel = PipelineParallel(),
                expert_parallel: bool = False) -> ModelRunner:
    registry = get_registry()
    platform = registry.select_platform("cpu")
    source = open_model(path)
    runner = ModelRunner(source.hf_config, source.weights(), platform, registry, torch.float32, BLOCK, 128, tp=tp, pp=pp,
                         expert_parallel=expert_parallel)
    runner.prepare_inputs(256, 8, 128)
    runner.allocate_kv_cache(32)
    return runner


def prefill_step() -> SchedulerOutput:
    """PROMPTS in one step, each asking for its greedy token, top logprobs and prompt logprobs."""
    params = SamplingParams(temperature=0, logprobs=4, prompt_logprobs=2, max_tokens=4)
    scheduled, block = [], 1
    for i, prompt in enumerate(PROMPTS):
        request = Request(f"r{i}", prompt, params, eos_token_ids=frozenset(), max_model_len=128)
        scheduled.append(ScheduledRequest(request, 0, len(prompt), [block]))
        block += 1
    return SchedulerOutput(scheduled=scheduled)


def run_prefill(path: str, tp: TensorParallel, expert_parallel: bool = False) -> dict:
    """Prefill PROMPTS in one step and return each request's greedy token and top logprobs."""
    out = make_runner(path, tp, expert_parallel=expert_parallel).execute(prefill_step())
    return {rid: (out.sampled[rid], out.logprobs[rid]) for rid in out.sampled}


def _rank_main(rank: int, world: int, store: str, cases: list[tuple[str, bool]], results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        comm = get_registry().communicator("cpu")()
        results[rank] = [run_prefill(path, TensorParallel(rank, world, comm), ep) for path, ep in cases]
    finally:
        dist.destroy_process_group()


def run_tensor_parallel(path: str, world: int, tmp_path, expert_parallel: bool = False) -> list[dict]:
    return [ranks[0] for ranks in run_parallel_cases([(path, expert_parallel)], world, tmp_path)]


def run_parallel_cases(cases: list[tuple[str, bool]], world: int, tmp_path) -> list[list[dict]]:
    """Per rank, each case's prefill results; the cases (checkpoint, expert parallelism) run one
    after another in one group of ``world`` processes."""
    manager = mp.get_context("spawn").Manager()
    results = manager.dict()
    mp.spawn(_rank_main, args=(world, str(tmp_path / "store"), cases, results), nprocs=world, join=True)
    return [results[r] for r in range(world)]


def assert_same_as_alone(ranks: dict, alone: dict, context: str = "") -> None:
    assert ranks.keys() == alone.keys()
    for rid, (token, [(ids, values, rank)]) in ranks.items():
        ref_token, [(ref_ids, ref_values, ref_rank)] = alone[rid]
        assert token == ref_token and ids == ref_ids and rank == ref_rank, (context, rid, ids, ref_ids)
        assert values == pytest.approx(ref_values, abs=1e-4), context


CASES = [("llama", {}), ("llama", {"num_key_value_heads": 1}), ("qwen2", {}), ("qwen3", {}), ("gemma", {}),
         ("gemma2", {}), ("mistral", {}), ("phi3", {})]


def test_two_ranks_compute_what_one_does(tmp_path):
    """Every architecture in one group of two processes (spawning a group costs more than a case)."""
    names = [f"{arch}{'-kv1' if overrides else ''}" for arch, overrides in CASES]
    paths = [str(make_tiny_checkpoint(tmp_path / name, arch, **overrides)) for name, (arch, overrides) in zip(names, CASES)]
    alone = [run_prefill(path, TensorParallel()) for path in paths]
    for ranks in run_parallel_cases([(path, False) for path in paths], 2, tmp_path):
        for name, result, expected in zip(names, ranks, alone):
            assert_same_as_alone(result, expected, name)


# Mixture-of-experts models on two ranks: each expert's width split (the default), or the experts
# themselves (--enable-expert-parallel: 4 whole experts a rank, pairs routed to the other rank's
# experts adding nothing); Qwen2-MoE's shared expert is split either way.
MOE_CASES = [("qwen2_moe", False), ("qwen2_moe", True), ("mixtral", True)]


def test_moe_ranks_split_by_width_or_by_expert_compute_what_one_does(tmp_path):
    from tiny_models import make_tiny_checkpoint as make

    paths = {arch: str(make(tmp_path, arch)) for arch in {arch for arch, _ in MOE_CASES}}
    alone = {arch: run_prefill(path, TensorParallel()) for arch, path in paths.items()}
    for ranks in run_parallel_cases([(paths[arch], ep) for arch, ep in MOE_CASES], 2, tmp_path):
        for (arch, ep), result in zip(MOE_CASES, ranks):
            assert_same_as_alone(result, alone[arch], f"{arch}, expert parallel {ep}")


def test_a_vocabulary_the_ranks_do_not_divide(tmp_path):
    from tiny_models import make_tiny_tokenizer
    vocab = len(make_tiny_tokenizer())
    path = str(make_tiny_checkpoint(tmp_path, "llama", vocab_size=vocab + 1 if vocab % 2 == 0 else vocab))
    alone = run_prefill(path, TensorParallel())
    for ranks in run_tensor_parallel(path, 2, tmp_path):
        assert {rid: v[0] for rid, v in ranks.items()} == {rid: v[0] for rid, v in alone.items()}


def test_sizes_that_do_not_split_are_refused_with_the_valid_ones():
    assert valid_sizes(32, 8, 14336) == [1, 2, 4, 8, 16, 32]
    assert valid_sizes(6, 2, 64) == [1, 2]
    with pytest.raises(ValueError, match="valid sizes: 1, 2$"):
        check_tensor_parallel(3, 6, 2, 64)
    check_tensor_parallel(2, 6, 2, 64)


class _HandOn:
    """Stands in for the communicator between stages of one process: what a stage sends, the next receives."""

    def __init__(self):
        self.sent = []

    def send(self, output):
        self.sent.append(output.clone())
        return self

    def wait(self):
        pass

    def receive(self, num_tokens):
        output = self.sent.pop(0)
        assert output.shape[:2] == (2, num_tokens)
        return output


@pytest.mark.parametrize("arch,overrides", CASES, ids=[f"{a}{'-kv1' if o else ''}" for a, o in CASES])
@pytest.mark.parametrize("stages", [2, 3])
def test_pipeline_stages_compute_what_one_model_does(arch, overrides, stages, tmp_path):
    path = str(make_tiny_checkpoint(tmp_path, arch, num_hidden_layers=5, **overrides))
    alone = make_runner(path).execute(prefill_step())
    runners = [make_runner(path, pp=PipelineParallel(rank, stages)) for rank in range(stages)]
    held = [sorted({int(n.split(".")[1]) for n, _ in r.model.named_parameters() if n.startswith("layers.")})
            for r in runners]
    assert sum(held, []) == list(range(5)) and [len(h) for h in held] == [5 // stages + (i < 5 % stages)
                                                                           for i in range(stages)]
    link = _HandOn()
    for runner in runners:
        runner.stage_link = link
    step = prefill_step()
    outputs = [runner.collect(runner.launch(step)) for runner in runners]
    assert all(not out.sampled and not out.prompt_logprobs for out in outputs[:-1])
    staged = outputs[-1]
    assert staged.sampled == alone.sampled
    for rid, [(ids, values, rank)] in alone.logprobs.items():
        [(staged_ids, staged_values, staged_rank)] = staged.logprobs[rid]
        assert staged_ids == ids and staged_rank == rank
        assert staged_values == pytest.approx(values, abs=1e-4)
    for rid, entries in alone.prompt_logprobs.items():
        assert [e[0] for e in staged.prompt_logprobs[rid]] == [e[0] for e in entries]
        assert [v for e in staged.prompt_logprobs[rid] for v in e[1]] == pytest.approx(
            [v for e in entries for v in e[1]], abs=1e-4)


def test_more_stages_than_layers_are_refused():
    check_pipeline_parallel(4, 4)
    with pytest.raises(ValueError, match="has 3 layers, fewer than --pipeline-parallel-size 4: use at most 3 stages"):
        check_pipeline_parallel(4, 3)
