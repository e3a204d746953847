"""The TPU plugin on XLA:CPU (``PJRT_DEVICE=CPU``): the XLA programs a TPU would run, compiled
and run on the host. Greedy output of a tiny random Llama against HF transformers in float32 on
the CPU, and the number of XLA compilations: every step (forward pass and sampling) is padded to
a (token bucket, sequence bucket) pair, so once a warm-up has reached every pair, varied
workloads (other lengths, batch sizes, greedy and seeded random rows mixed, top-k/top-p) compile
nothing. Sampling adds one program per pair for each feature group a step uses
(``runtime.sample.static_shapes``); these workloads use one, seeded rows, so the total stays
within two programs per pair: with and without seeded rows.

Needs torch-xla, which pins its own torch: scripts/tpu-xla-cpu.sh makes that environment and
runs this file there (in the project's own environment it is skipped).
"""

from __future__ import annotations

import os
import random

import pytest
import torch
import transformers

os.environ.setdefault("PJRT_DEVICE", "CPU")
torch_xla = pytest.importorskip("torch_xla", reason="needs torch-xla: run scripts/tpu-xla-cpu.sh")
import torch_xla.debug.metrics as metrics  # noqa: E402

from runtime import LLM, SamplingParams  # noqa: E402
from runtime.platform.buckets import sequence_buckets, token_buckets  # noqa: E402
from runtime_conformance.tiny_model import VOCAB_SIZE, write_tiny_model  # noqa: E402

MAX_TOKENS = 10
BATCHED_TOKENS, MAX_SEQS, MAX_MODEL_LEN = 64, 8, 128
PAIRS = [(t, s) for t in token_buckets(BATCHED_TOKENS) for s in sequence_buckets(MAX_SEQS) if s <= t]


def prompts(seed: int, lengths: list[int]) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB_SIZE) for _ in range(n)] for n in lengths]


def compilations() -> int:
    """XLA programs compiled in this process (torch-xla's CompileTime metric counts them)."""
    data = metrics.metric_data("CompileTime")
    return 0 if data is None else int(data[0])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny-llama"), head_size=32)


@pytest.fixture(scope="module")
def llm(checkpoint):
    engine = LLM(str(checkpoint), device="tpu", dtype="float32", block_size=16, max_model_len=MAX_MODEL_LEN,
                 max_num_batched_tokens=BATCHED_TOKENS, max_num_seqs=MAX_SEQS, kv_cache_memory="16MiB",
                 enable_prefix_caching=False)
    engine.compiled_at_start = compilations()
    return engine


@pytest.fixture(scope="module")
def hf_model(checkpoint):
    return transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()


def hf_greedy(model, prompt: list[int]) -> list[int]:
    """Argmax continuation, end-of-sequence included (the engine runs with ignore_eos)."""
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(MAX_TOKENS):
            tokens.append(int(model(torch.tensor([tokens])).logits[0, -1].argmax()))
    return tokens[len(prompt):]


def greedy(max_tokens: int = MAX_TOKENS) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def run(llm, batch: list[list[int]], params) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in llm.generate(batch, params, use_tqdm=False)]


def varied(seed: int) -> tuple[list[list[int]], list[SamplingParams]]:
    """A batch of 1 to 8 prompts of 1 to 60 tokens, each greedy or seeded random with top-k/top-p/min-p."""
    rng = random.Random(seed)
    count = rng.randint(1, MAX_SEQS)
    batch = prompts(seed, [rng.randint(1, 60) for _ in range(count)])
    params = [greedy(rng.randint(1, MAX_TOKENS)) if rng.random() < 0.4 else
              SamplingParams(temperature=rng.uniform(0.5, 1.5), top_k=rng.choice([0, 5, 40]),
                             top_p=rng.choice([1.0, 0.8]), min_p=rng.choice([0.0, 0.05]), seed=rng.randrange(1000),
                             max_tokens=rng.randint(1, MAX_TOKENS), ignore_eos=True)
              for _ in batch]
    return batch, params


def test_greedy_matches_hf(llm, hf_model):
    batch = prompts(0, [5, 17, 40, 1])
    for prompt, tokens in zip(batch, run(llm, batch, greedy())):
        assert tokens == hf_greedy(hf_model, prompt), prompt


def test_after_warm_up_varied_workloads_compile_nothing(llm):
    # Warm-up: for each pair, a prefill step of that many sequences and tokens (whose decode
    # steps reach the smallest token bucket with the same sequences), with seeded rows and without.
    before = compilations()
    for tokens, seqs in PAIRS:
        lengths = [tokens // seqs + (1 if i < tokens % seqs else 0) for i in range(seqs)]
        for seed in (1, None):
            run(llm, prompts(tokens * 100 + seqs, lengths), SamplingParams(temperature=0.8, top_p=0.9, seed=seed,
                                                                          max_tokens=2, ignore_eos=True))
    warm = compilations()
    reference = [run(llm, *varied(seed)) for seed in range(6)]
    assert compilations() == warm, "a varied workload compiled new programs after the warm-up: some shape is not bucketed"
    # Seeded rows and greedy rows give the same tokens again, in other batches.
    assert [run(llm, *varied(seed)) for seed in range(6)] == reference
    total = compilations() - llm.compiled_at_start
    print(f"XLA compilations: {total} in all: {before - llm.compiled_at_start} for the greedy check, "
          f"{warm - before} more in the warm-up over {len(PAIRS)} (token, sequence) bucket pairs with and without "
          f"seeded rows, {compilations() - warm} for 12 varied batches; "
          f"UncachedCompile {metrics.counter_value('UncachedCompile')}")
    assert total <= 2 * len(PAIRS)
