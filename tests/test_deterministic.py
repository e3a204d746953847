"""--deterministic: a request's tokens and logprobs are bitwise the same alone and mixed into a
busy engine (random other requests arriving at random steps, chunked prefill, prefix caching).

Every tiny architecture (dense and mixture-of-experts) runs 3 seeded sampled and 3 greedy
requests; the embedded model 1 and 1 (each alone run is a whole engine pass: the full 20 + 20 on
the embedded model is benchmarks/deterministic_cost.py --check, kept out of CI for time). Without
the flag the same schedule changes logprobs (torch's CPU matmul blocks by the batch's row count):
a test shows it, so the mode is what makes the difference.
"""

from __future__ import annotations

import random

import pytest
import torch

from determinism import mixed_jobs, run_schedule, targets
from runtime.engine.args import EngineArgs
from runtime.engine.core import EngineCore
from runtime_conformance.batch_invariance import assert_batch_invariant, row_ops
from runtime_cpu.moe import fused_moe
from tiny_models import ARCHITECTURES, MOE_ARCHITECTURES, make_tiny_checkpoint

pytestmark = pytest.mark.xdist_group("deterministic")

# A small token budget splits most prompts into several prefill chunks, shared with other requests.
OPTIONS = dict(kv_cache_memory="16MiB", max_model_len=256, max_num_batched_tokens=48, enable_prefix_caching=True)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("deterministic")
    return {arch: make_tiny_checkpoint(root, arch) for arch in ARCHITECTURES + MOE_ARCHITECTURES}


def alone_and_mixed(core, vocab: int, seed: int, sampled: int, greedy: int, max_tokens: int, others: int):
    rng = random.Random(seed)
    target_jobs = targets(rng, vocab, sampled, greedy, max_tokens)
    alone = {rid: run_schedule(core, [(0, rid, prompt, params)])[rid] for _, rid, prompt, params in target_jobs}
    mixed = run_schedule(core, mixed_jobs(rng, vocab, target_jobs, others, last_step=8))
    return alone, {rid: mixed[rid] for rid in alone}


@pytest.mark.parametrize("arch", ARCHITECTURES + MOE_ARCHITECTURES)
def test_tokens_and_logprobs_do_not_depend_on_the_batch(arch, checkpoints):
    core = EngineCore(EngineArgs(model=str(checkpoints[arch]), deterministic=True, **OPTIONS))
    alone, mixed = alone_and_mixed(core, core.runner.settings.vocab_size, seed=1, sampled=3, greedy=3,
                                   max_tokens=10, others=12)
    for rid in alone:
        assert mixed[rid] == alone[rid], f"{arch} {rid}: tokens or logprobs differ alone and mixed into a batch"


@pytest.mark.slow
def test_embedded_model_does_not_depend_on_the_batch():
    core = EngineCore(EngineArgs(deterministic=True, kv_cache_memory="64MiB", max_model_len=256,
                                 max_num_batched_tokens=48))
    alone, mixed = alone_and_mixed(core, core.runner.settings.vocab_size, seed=2, sampled=1, greedy=1,
                                   max_tokens=4, others=5)
    for rid in alone:
        assert mixed[rid] == alone[rid], f"embedded {rid}: tokens or logprobs differ alone and mixed into a batch"


def test_without_the_flag_the_batch_changes_logprobs(checkpoints):
    core = EngineCore(EngineArgs(model=str(checkpoints["llama"]), **OPTIONS))
    alone, mixed = alone_and_mixed(core, core.runner.settings.vocab_size, seed=1, sampled=3, greedy=3,
                                   max_tokens=10, others=12)
    assert any(mixed[rid][1] != alone[rid][1] for rid in alone), \
        "the default mode gave batch-invariant logprobs here: the deterministic tests no longer prove the flag matters"


def test_a_model_needing_an_op_without_a_batch_invariant_kernel_is_refused_naming_it(checkpoints):
    """LoRA's kernels keep no row apart on the CPU: the engine refuses the mode, naming the op and the way out."""
    with pytest.raises(ValueError, match=r"lora_add: run without --deterministic or without --enable-lora"):
        EngineCore(EngineArgs(model=str(checkpoints["llama"]), deterministic=True, enable_lora=True, **OPTIONS))


def test_the_batch_invariance_check_fails_the_default_moe_kernel():
    """The CPU's grouped expert matmul blocks an expert's rows by their number: the conformance
    suite's check fails it, so its pass of the padded kernel the mode runs means something."""
    with pytest.raises(AssertionError, match="not batch-invariant"):
        assert_batch_invariant(row_ops(fused_moe, torch.float32, torch.device("cpu"))["fused_moe"], "grouped fused_moe")
