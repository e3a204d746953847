"""The embedded default model (SmolLM2-135M-Instruct, GGUF Q4_1) against HF transformers loading
the same file: greedy tokens agree, and a chat answer is coherent English."""

from __future__ import annotations

import pytest

from runtime import LLM, SamplingParams

from hf_reference import assert_greedy_matches, embedded_hf_model, hf_greedy

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("embedded")]

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "List three colors:",
]
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def llm():
    """The default dtype, float32 on the CPU, and the weights as HF transformers loads the GGUF
    (dequantized; the CPU's default int8 requantization is tested against HF in test_int8_quant.py)."""
    return LLM(None, kv_cache_memory="256MiB", max_model_len=1024, quantization="none")


@pytest.fixture(scope="module")
def hf_model():
    return embedded_hf_model()


def test_greedy_matches_hf_on_the_gguf(llm, hf_model):
    tokenizer = llm.get_tokenizer()
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    for prompt, out in zip(PROMPTS, outputs):
        ids = tokenizer.encode(prompt)
        assert out.prompt_token_ids == ids
        ref_tokens, ref_rows = hf_greedy(hf_model, ids, NEW_TOKENS)
        assert_greedy_matches(out.outputs[0].token_ids, ref_tokens, ref_rows, context=prompt)


def test_chat_answer_is_coherent(llm):
    params = SamplingParams(temperature=0.0, max_tokens=48)
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}], params, use_tqdm=False)[0]
    completion = out.outputs[0]
    assert "Paris" in completion.text
    assert completion.finish_reason == "stop"
    assert completion.text.isascii() and len(completion.text.split()) >= 4


def test_batch_of_sixteen_equals_one_at_a_time(llm):
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    prompts = [f"{p} (variant {i})" for i in range(4) for p in PROMPTS]
    batched = llm.generate(prompts, params, use_tqdm=False)
    for prompt, out in zip(prompts[:4], batched[:4]):
        alone = llm.generate([prompt], params, use_tqdm=False)[0]
        assert alone.outputs[0].token_ids == out.outputs[0].token_ids
