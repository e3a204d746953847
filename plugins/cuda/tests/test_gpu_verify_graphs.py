"""Speculative verification steps replayed from CUDA graphs (1 + k query tokens per sequence,
fewer proposals padded): greedy output with proposals and graphs is the output without
proposals, the verification graphs were replayed (the runner's replay counts by shape, not
timing), the draft model's passes replayed its decode graphs, and seeded sampling draws the
same tokens with graphs as eagerly; verifications chained on the device (greedy, no logprobs)
give the tokens of the engine without proposals. Tiny random models, float32 and bfloat16.

Skipped without a GPU. Run: ``.venv/bin/python -m pytest -q plugins/cuda/tests/test_gpu_verify_graphs.py``.
"""

from __future__ import annotations

import gc
import math
import random
import sys
from pathlib import Path

import pytest
import torch

from runtime import LLM, SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

REPO_TESTS = Path(__file__).resolve().parents[3] / "tests"
# How close a near-tie must be (logprob gap) to excuse a different greedy token, per dtype.
LOGPROB_TOLERANCE = {"float32": 1e-3, "bfloat16": 0.35}
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    sys.path.insert(0, str(REPO_TESTS))
    from tiny_models import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("verify_graphs"), "llama")


def _prompts() -> list[list[int]]:
    """Prompts that repeat themselves, of varied lengths: the n-gram lookup proposes 0 to 4 tokens."""
    rng = random.Random(3)
    prompts = []
    for i in range(6):
        base = [rng.randrange(6, 300) for _ in range(rng.randrange(3, 30))]
        prompts.append((base * 3)[:len(base) * 2 + i % 5])
    return prompts


def _generate(path, dtype: str, params: SamplingParams, launch_early: bool = False, **engine_args):
    """(CompletionOutputs, verification replays, draft replays) of a fresh engine on ``_prompts()``.
    ``launch_early``: an eager engine schedules as one with graphs (the step after one that
    verified nothing looked ahead, see ``EngineCore._looks_ahead``)."""
    llm = LLM(str(path), device="cuda", dtype=dtype, kv_cache_memory="64MiB", max_num_seqs=8, **engine_args)
    if launch_early:
        llm.engine.launch_early = True
    outputs = [o.outputs[0] for o in llm.generate([{"prompt_token_ids": p} for p in _prompts()], params,
                                                   use_tqdm=False)]
    runner = llm.engine.runner
    graphs = runner.decode_graphs
    verify = sum(n for (_, query_len), n in graphs.replays.items() if query_len > 1) if graphs is not None else 0
    draft = sum(runner.draft.decode_graphs.replays.values()) if runner.draft is not None and \
        runner.draft.decode_graphs is not None else 0
    del llm, runner, graphs
    gc.collect()
    torch.cuda.empty_cache()
    return outputs, verify, draft


def _divergence(ours, ref, tolerance: float) -> str | None:
    """Where greedy ``ours`` departs from ``ref`` (with logprobs) beyond a near-tie."""
    for step, (token, ref_token) in enumerate(zip(ours.token_ids, ref.token_ids)):
        if token == ref_token:
            continue
        row = ref.logprobs[step]
        gap = row[ref_token].logprob - (row[token].logprob if token in row else -math.inf)
        return None if gap <= tolerance else f"token {step}: {token}, without proposals {ref_token} (gap {gap:.4f})"
    return None if len(ours.token_ids) == len(ref.token_ids) else "different lengths"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_greedy_output_with_verification_graphs_matches_without_proposals(dtype, checkpoint):
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True, logprobs=5)
    plain, _, _ = _generate(checkpoint, dtype, params)
    configs = [NGRAM, {"method": "draft_model", "model": str(checkpoint), "num_speculative_tokens": 3}]
    for config in configs:
        ours, verify_replays, draft_replays = _generate(checkpoint, dtype, params, speculative_config=config)
        problems = [f"prompt {i}: {d}" for i, (o, r) in enumerate(zip(ours, plain))
                    if (d := _divergence(o, r, LOGPROB_TOLERANCE[dtype]))]
        assert not problems, f"{config['method']} with graphs ({dtype}) changed the output: " + "; ".join(problems)
        assert verify_replays > 0, f"{config['method']}: no verification step replayed a graph"
        if config["method"] == "draft_model":
            assert draft_replays > 0, "the draft model's passes replayed no decode graph"


def test_seeded_sampling_draws_the_same_tokens_with_and_without_verification_graphs(checkpoint):
    params = SamplingParams(temperature=0.8, top_k=40, top_p=0.95, seed=11, max_tokens=32, ignore_eos=True)
    graphs, verify_replays, _ = _generate(checkpoint, "float32", params, speculative_config=NGRAM)
    # A seeded request's draws follow its proposals, which follow the schedule: the same one.
    eager, eager_replays, _ = _generate(checkpoint, "float32", params, launch_early=True, speculative_config=NGRAM,
                                        enforce_eager=True)
    assert verify_replays > 0 and eager_replays == 0
    assert [o.token_ids for o in graphs] == [o.token_ids for o in eager]


@pytest.mark.parametrize("from_ahead", [False, True], ids=["after every step", "after steps launched ahead"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_verifications_chained_on_the_device_match_without_proposals(dtype, from_ahead, checkpoint):
    """Greedy requests without logprobs: each verification is launched behind the one in flight,
    its inputs and n-gram proposals made on the device (worker/verify_chain.py); here after every
    step, proposals found or not (the tiny random model seldom repeats itself, so the engine's
    rule would end most chains), or only after plain decode steps launched ahead (each chain one
    step long, then a step made on the host, then one launched ahead, ``EngineCore._looks_ahead``):
    chains begin from a step whose input token is still on the device. The tokens are those of
    the engine without proposals (its logprobs excuse near-ties)."""
    reference, _, _ = _generate(checkpoint, dtype, SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True,
                                                                  logprobs=5))
    llm = LLM(str(checkpoint), device="cuda", dtype=dtype, kv_cache_memory="64MiB", max_num_seqs=8,
              speculative_config=NGRAM)
    engine, chained = llm.engine, []
    assert engine.chains_verification
    if from_ahead:
        engine._proposing = lambda out: not out.scheduled[0].chained and any(s.token_pending for s in out.scheduled)
    else:
        engine._proposing = lambda out: True
    launch_chained, after_ahead = engine.runner.launch_chained, []

    def counted(out, previous):
        chained.append(previous.chained)
        after_ahead.append(not previous.chained and any(s.token_pending for s in previous.scheduled))
        return launch_chained(out, previous)

    engine.runner.launch_chained = counted
    ours = [o.outputs[0] for o in llm.generate([{"prompt_token_ids": p} for p in _prompts()],
                                                SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True),
                                                use_tqdm=False)]
    problems = [f"prompt {i}: {d}" for i, (o, r) in enumerate(zip(ours, reference))
                if (d := _divergence(o, r, LOGPROB_TOLERANCE[dtype]))]
    assert not problems, f"chained verification ({dtype}) changed the output: " + "; ".join(problems)
    if from_ahead:
        assert sum(after_ahead) >= 3, "chains seldom began from a step launched ahead"
    else:
        assert sum(chained) >= 5, "chains never went past one step"
    assert engine.stats().spec_num_accepted_tokens > 0
