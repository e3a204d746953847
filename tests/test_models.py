"""Every supported architecture generates what HF transformers generates from the same checkpoint,
whatever the scheduling: chunked prefill, preemption, prefix caching, requests arriving mid-run."""

from __future__ import annotations

import random

import pytest
import torch
import transformers

from runtime import LLM, SamplingParams
from runtime.engine.args import EngineArgs
from runtime.engine.core import EngineCore

from hf_reference import assert_greedy_matches, hf_greedy
from tiny_models import ARCHITECTURES, make_tiny_checkpoint

MAX_NEW = 10


def make_prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    """Mixed lengths (one under a block, several blocks), two sharing a 24-token prefix."""
    rng = random.Random(seed)
    draw = lambda n: [rng.randrange(6, vocab) for _ in range(n)]  # noqa: E731  (skip special ids)
    shared = draw(24)
    return [draw(5), draw(17), shared + draw(3), draw(40), shared + draw(9)]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {arch: make_tiny_checkpoint(root, arch) for arch in ARCHITECTURES}


def reference(path, prompts):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return [hf_greedy(model, p, MAX_NEW) for p in prompts]


def check(outputs, prompts, refs, logprob_tol=1e-3, context=""):
    for prompt, out, (ref_tokens, ref_rows) in zip(prompts, outputs, refs):
        completion = out.outputs[0]
        assert out.prompt_token_ids == prompt
        assert_greedy_matches(completion.token_ids, ref_tokens, ref_rows, context=context)
        for step, (token, entry) in enumerate(zip(completion.token_ids, completion.logprobs)):
            if token != ref_tokens[step]:
                break
            assert abs(entry[token].logprob - float(ref_rows[step][token])) < logprob_tol, f"{context} step {step}"


GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=2)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_matches_hf(arch, checkpoints):
    path = checkpoints[arch]
    llm = LLM(str(path), dtype="float32", kv_cache_memory="16MiB", max_model_len=256)
    prompts = make_prompts(llm.engine.runner.settings.vocab_size)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    check(outputs, prompts, reference(path, prompts), context=arch)


SCHEDULES = {
    "chunked_prefill": dict(max_num_batched_tokens=8),
    "preemption": dict(num_blocks=18, block_size=4),
    "no_prefix_caching": dict(enable_prefix_caching=False),
    "one_seq_at_a_time": dict(max_num_seqs=1),
}


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_schedules_do_not_change_output(arch, schedule, checkpoints):
    path = checkpoints[arch]
    options = dict(dtype="float32", kv_cache_memory="16MiB", max_model_len=64)
    options.update(SCHEDULES[schedule])
    num_blocks = options.pop("num_blocks", None)
    if num_blocks is not None:
        # Enough KV for one max-length sequence and little more, so several requests must preempt.
        # (2 layers x K/V x block_size x 2 kv heads x head_dim 16 x 4 bytes) per block.
        options["kv_cache_memory"] = num_blocks * 2 * 2 * options["block_size"] * 2 * 16 * 4
    llm = LLM(str(path), **options)
    prompts = make_prompts(llm.engine.runner.settings.vocab_size, seed=1)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    check(outputs, prompts, reference(path, prompts), context=f"{arch}/{schedule}")
    if schedule == "preemption":
        assert llm.engine.scheduler.num_preemptions > 0, "the tiny cache should have forced preemption"
    assert llm.engine.kv_manager.usage == 0.0


def test_requests_arriving_mid_generation(checkpoints):
    path = checkpoints["qwen3"]
    engine = EngineCore(EngineArgs(model=str(path), dtype="float32", kv_cache_memory="16MiB", max_model_len=128))
    prompts = make_prompts(engine.runner.settings.vocab_size, seed=2)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    tokens: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    for i in (0, 1):
        engine.add_request(str(i), prompts[i], params)
    for _ in range(3):
        for out in engine.step():
            tokens[out.request_id].extend(out.new_token_ids)
    for i in range(2, len(prompts)):
        engine.add_request(str(i), prompts[i], params)
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens[out.request_id].extend(out.new_token_ids)
    refs = reference(path, prompts)
    for i, (ref_tokens, ref_rows) in enumerate(refs):
        assert_greedy_matches(tokens[str(i)], ref_tokens, ref_rows, context=f"request {i}")


def test_prefix_cache_hit_reuses_blocks_and_keeps_output(checkpoints):
    path = checkpoints["llama"]
    llm = LLM(str(path), dtype="float32", kv_cache_memory="16MiB", max_model_len=128)
    prompts = make_prompts(llm.engine.runner.settings.vocab_size, seed=3)
    refs = reference(path, prompts)
    first = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    hits_before = llm.engine.kv_manager.prefix_cache_hits
    second = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    assert llm.engine.kv_manager.prefix_cache_hits > hits_before
    check(first, prompts, refs)
    check(second, prompts, refs)


def test_prompt_logprobs_match_hf(checkpoints):
    path = checkpoints["mistral"]
    llm = LLM(str(path), dtype="float32", kv_cache_memory="16MiB", max_model_len=128, max_num_batched_tokens=8)
    prompt = make_prompts(llm.engine.runner.settings.vocab_size, seed=4)[3]
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=1, prompt_logprobs=1), use_tqdm=False)[0]
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.inference_mode():
        expected = model(torch.tensor([prompt])).logits[0].float().log_softmax(-1)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for position in range(1, len(prompt)):
        entry = out.prompt_logprobs[position]
        token = prompt[position]
        assert abs(entry[token].logprob - float(expected[position - 1, token])) < 1e-3


def test_unsupported_architecture_is_named(tmp_path, checkpoints):
    import json
    import shutil

    path = tmp_path / "unknown"
    shutil.copytree(checkpoints["llama"], path)
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = ["FancyNewForCausalLM"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unsupported architecture FancyNewForCausalLM; supported: LlamaForCausalLM"):
        LLM(str(path))


def test_kv_cache_too_small_names_the_fix(checkpoints):
    with pytest.raises(ValueError, match="lower --max-model-len or raise --kv-cache-memory"):
        LLM(str(checkpoints["llama"]), kv_cache_memory="4KiB", max_model_len=512)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_parameter_count_known_before_loading(arch, checkpoints):
    from runtime.models import decoder_settings

    config = transformers.AutoConfig.from_pretrained(checkpoints[arch])
    model = transformers.AutoModelForCausalLM.from_config(config)
    expected = sum(p.numel() for n, p in model.named_parameters())
    assert decoder_settings(config).num_parameters() == expected


def test_model_too_big_for_memory_names_the_fix(checkpoints, monkeypatch):
    from runtime_cpu.platform import CpuPlatform

    monkeypatch.setattr(CpuPlatform, "memory_info", lambda self, index=0: (1000, 2000))
    with pytest.raises(ValueError, match="model needs 0.00 GiB for its weights in float32, only 0.00 GiB is free on cpu"):
        LLM(str(checkpoints["llama"]), dtype="float32")


@pytest.mark.parametrize("arch", ["mistral", "gemma2"])
def test_sliding_window_shorter_than_the_prompts(arch, tmp_path):
    path = make_tiny_checkpoint(tmp_path, arch, sliding_window=8)
    llm = LLM(str(path), dtype="float32", kv_cache_memory="16MiB", max_model_len=128, max_num_batched_tokens=16)
    assert 8 in llm.engine.runner.settings.sliding_windows
    prompts = make_prompts(llm.engine.runner.settings.vocab_size, seed=5)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    check(outputs, prompts, reference(path, prompts), context=f"{arch}/window 8")
