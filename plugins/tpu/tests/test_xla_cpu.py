"""The TPU plugin on XLA:CPU (``PJRT_DEVICE=CPU``): the XLA programs a TPU would run, compiled
and run on the host. Greedy output of a tiny random Llama against HF transformers in float32 on
the CPU, and the number of XLA compilations: each step is padded to a static-shape bucket, so a
second run of the workload compiles nothing, and a new workload compiles at most one program
per (token bucket, sequence bucket) pair it reaches that the first did not.

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
from runtime_conformance.tiny_model import VOCAB_SIZE, write_tiny_llama  # noqa: E402

MAX_TOKENS = 10
BATCHED_TOKENS, MAX_SEQS = 64, 8


def prompts(seed: int, lengths: list[int]) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB_SIZE) for _ in range(n)] for n in lengths]


def compilations() -> int:
    data = metrics.metric_data("CompileTime")
    return 0 if data is None else int(data[0])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), head_size=32)


@pytest.fixture(scope="module")
def llm(checkpoint):
    return LLM(str(checkpoint), device="tpu", dtype="float32", block_size=16, max_model_len=128,
               max_num_batched_tokens=BATCHED_TOKENS, max_num_seqs=MAX_SEQS, kv_cache_memory="16MiB")


def hf_greedy(model, prompt: list[int]) -> list[int]:
    """Argmax continuation, end-of-sequence included (the engine runs with ignore_eos)."""
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(MAX_TOKENS):
            tokens.append(int(model(torch.tensor([tokens])).logits[0, -1].argmax()))
    return tokens[len(prompt):]


@pytest.fixture(scope="module")
def hf_model(checkpoint):
    return transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()


def run(llm, batch: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    return [list(o.outputs[0].token_ids) for o in llm.generate(batch, params, use_tqdm=False)]


def test_greedy_matches_hf_and_steps_compile_once_per_bucket(llm, hf_model):
    first = prompts(0, [5, 17, 40, 1])
    before = compilations()
    got = run(llm, first)
    warm = compilations()
    for prompt, tokens in zip(first, got):
        assert tokens == hf_greedy(hf_model, prompt), prompt
    assert run(llm, first) == got
    assert compilations() == warm, "the same workload again compiled new programs: some step shape is not bucketed"
    # New lengths and batch sizes, within the same buckets.
    second = prompts(1, [9, 30])
    again = run(llm, second)
    for prompt, tokens in zip(second, again):
        assert tokens == hf_greedy(hf_model, prompt), prompt
    pairs = len(token_buckets(BATCHED_TOKENS)) * len(sequence_buckets(MAX_SEQS))
    print(f"XLA compilations: {warm - before} for the first workload, {compilations() - warm} for the second; "
          f"{pairs} (token bucket, sequence bucket) pairs")
    assert compilations() - before <= pairs
