"""End to end: a tiny random Llama generates on the platform what it generates on the reference
platform (the core's reference attention and kernels, float32 on the CPU), greedy; seeded
sampling is reproducible; chunked prefill and preemption leave the output unchanged. Models with
the features a platform declares (Gemma-2's sliding window, soft-capping and GELU; Qwen-2's
q/k/v biases; Qwen-3's q/k norms) match the reference in every declared dtype, whole and in
chunks shorter than the sliding window.

The Llama runs in float32 where the platform supports it, else in its default dtype, with
that dtype's tolerance: a different greedy token is accepted only at a near-tie.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import pytest

from runtime.engine.args import EngineArgs
from runtime.engine.core import EngineCore
from runtime.sample.params import SamplingParams

from ..compare import dtype_name
from ..generation import generate, greedy_differences
from ..reference_platform import NAME as REFERENCE, reference_registry
from ..specs import dtypes, main_dtype, pick
from ..tiny_model import FEATURE_MODELS, VOCAB_SIZE, write_tiny_model
from ..tolerances import tolerance

MAX_TOKENS = 12
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=5)


@dataclass
class Model:
    path: Path
    dtype_name: str
    block_size: int
    prompts: list[list[int]]


def _prompts() -> list[list[int]]:
    """Lengths from 1 token to several blocks; two share a 24-token prefix (a prefix-cache hit)."""
    rng = random.Random(0)
    draw = lambda n: [rng.randrange(3, VOCAB_SIZE) for _ in range(n)]  # noqa: E731  (ids 0-2 are special)
    shared = draw(24)
    return [draw(5), draw(17), shared + draw(3), draw(40), shared + draw(9), draw(1)]


@pytest.fixture(scope="module")
def model(target, tmp_path_factory) -> Model:
    platform = target.require_platform()
    if not target.backends:
        pytest.fail("no attention backend registered: no model can run")
    backend = target.backends[0]
    head_size = pick(backend.supported_head_sizes, 64)
    path = write_tiny_model(tmp_path_factory.mktemp("tiny-llama"), head_size)
    dtype = main_dtype(backend, platform)
    return Model(path, dtype_name(dtype), pick(backend.supported_block_sizes, 16), _prompts())


def _engine(model: Model, registry, device: str, dtype: str, **overrides) -> EngineCore:
    args = dict(model=str(model.path), device=device, dtype=dtype, block_size=model.block_size, max_model_len=128,
                kv_cache_memory="16MiB", seed=0)
    return EngineCore(EngineArgs(**{**args, **overrides}), registry=registry)


@pytest.fixture(scope="module")
def reference(model):
    engine = _engine(model, reference_registry(), REFERENCE, "float32")
    return generate(engine, model.prompts, [GREEDY] * len(model.prompts))


@pytest.fixture(scope="module")
def engine(target, model) -> EngineCore:
    return _engine(model, target.registry, target.name, model.dtype_name)


def _assert_matches_reference(engine: EngineCore, model: Model, reference, what: str) -> None:
    generated = generate(engine, model.prompts, [GREEDY] * len(model.prompts))
    problems = greedy_differences(generated, reference, tolerance(engine.dtype).logprob)
    assert not problems, f"{what}: greedy output differs from the reference platform's: " + "; ".join(problems)


def test_greedy_matches_reference(engine, model, reference):
    _assert_matches_reference(engine, model, reference, f"{engine.platform.name} ({model.dtype_name})")


def test_seeded_sampling_reproducible(engine, model):
    def sampled(seed):
        return SamplingParams(temperature=0.8, top_p=0.95, top_k=40, seed=seed, max_tokens=MAX_TOKENS, ignore_eos=True)

    a, b, c = model.prompts[:3]
    first = generate(engine, [a, b], [sampled(11), sampled(12)])
    # The same seeds in another batch, in another order, beside an unseeded request.
    second = generate(engine, [c, b, a], [SamplingParams(temperature=1.0, max_tokens=MAX_TOKENS), sampled(12), sampled(11)])
    assert [g.tokens for g in first] == [second[2].tokens, second[1].tokens], (
        f"seeded sampling is not reproducible: seed 11 gave {first[0].tokens} then {second[2].tokens}; "
        f"seed 12 gave {first[1].tokens} then {second[1].tokens}")


def test_chunked_prefill_unchanged(target, model, reference):
    engine = _engine(model, target.registry, target.name, model.dtype_name, max_num_batched_tokens=8)
    _assert_matches_reference(engine, model, reference, "with chunked prefill (8-token steps)")


def test_preemption_unchanged(target, model, reference, engine):
    # Room for one 64-token sequence and two blocks more: the six prompts must preempt each other.
    blocks = -(-64 // engine.block_size) + 3
    small = _engine(model, target.registry, target.name, model.dtype_name, max_model_len=64,
                    kv_cache_memory=blocks * engine.runner.kv_bytes_per_block())
    _assert_matches_reference(small, model, reference, "with preemption")
    assert small.scheduler.num_preemptions > 0, f"the check could not force a preemption with a cache of {blocks} blocks"


FEATURE_CHUNK = 4
"""Prefill chunk of the feature models' chunked runs: shorter than Gemma-2's 8-token window,
which whole prefills of the longer prompts exceed."""


@pytest.mark.parametrize("arch", sorted(FEATURE_MODELS))
def test_feature_models_match_reference(arch, target, tmp_path_factory):
    """Greedy output of a model with the architecture's features, in every dtype the platform and
    its backend declare, whole and in chunks, against the reference platform in float32 (the
    prompts share a prefix: the second is a prefix-cache hit)."""
    platform = target.require_platform()
    if not target.backends:
        pytest.fail("no attention backend registered: no model can run")
    backend = target.backends[0]
    if arch == "gemma2" and not any(b.supports_sliding_window and b.supports_logits_soft_cap for b in target.backends):
        pytest.skip(f"unsupported: no attention backend of {platform.name} declares sliding windows and soft-capping")
    head_size = pick(backend.supported_head_sizes, 64)
    model = Model(write_tiny_model(tmp_path_factory.mktemp(arch), head_size, arch), "float32",
                  pick(backend.supported_block_sizes, 16), _prompts())
    params = [GREEDY] * len(model.prompts)
    reference = generate(_engine(model, reference_registry(), REFERENCE, "float32"), model.prompts, params)
    problems = []
    for dtype in dtypes(backend, platform):
        for chunk in (None, FEATURE_CHUNK):
            overrides = {} if chunk is None else {"max_num_batched_tokens": chunk, "max_num_seqs": chunk}
            engine = _engine(model, target.registry, target.name, dtype_name(dtype), **overrides)
            generated = generate(engine, model.prompts, params)
            run = f"{dtype_name(dtype)}{'' if chunk is None else f', {chunk}-token chunks'}"
            problems += [f"{run}: {p}" for p in greedy_differences(generated, reference, tolerance(dtype).logprob)]
    assert not problems, (f"{arch} ({FEATURE_MODELS[arch][2]}): greedy output differs from the reference "
                          f"platform's: " + "; ".join(problems))
