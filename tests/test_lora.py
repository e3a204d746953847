"""LoRA adapters: generation with a PEFT adapter equals HF transformers + PEFT on the same base
and adapter, for every architecture; many adapters in one batch give each request what it gets
alone; bad adapters are refused with the reason."""

from __future__ import annotations

import json

import pytest

from runtime import LLM, LoRARequest, SamplingParams

from hf_reference import assert_greedy_matches, hf_greedy
from lora_adapters import FUSED, SEPARATE, make_adapter
from tiny_models import make_tiny_checkpoint

PROMPTS = [[5, 9, 2, 7, 11, 3, 8, 14, 6], [4, 4, 6, 21, 30]]

CASES = [("llama", 8, SEPARATE, False), ("qwen2", 16, ["q_proj", "v_proj"], False), ("qwen3", 8, SEPARATE, True),
         ("gemma", 16, SEPARATE, False), ("gemma2", 8, ["o_proj", "down_proj", "up_proj"], False),
         ("mistral", 32, SEPARATE, False), ("phi3", 16, FUSED, False)]


@pytest.mark.parametrize("arch,rank,targets,rslora", CASES, ids=[c[0] for c in CASES])
def test_an_adapter_generates_what_peft_does(arch, rank, targets, rslora, tmp_path):
    base = make_tiny_checkpoint(tmp_path, arch)
    reference = make_adapter(base, tmp_path / "adapter", rank, targets, seed=3, rslora=rslora)
    llm = LLM(str(base), enable_lora=True, max_lora_rank=max(16, rank), kv_cache_memory="8MiB", max_model_len=128)
    adapter = LoRARequest("tuned", 1, str(tmp_path / "adapter"))
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=1)
    tuned = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False, lora_request=adapter)
    plain = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    for prompt, ours, base_out in zip(PROMPTS, tuned, plain):
        tokens, rows = hf_greedy(reference, prompt, 12)
        assert_greedy_matches(ours.outputs[0].token_ids, tokens, rows, context=f"{arch} with adapter")
        with reference.disable_adapter():
            base_tokens, _ = hf_greedy(reference, prompt, 12)
        assert base_tokens != tokens  # the adapter changes the output, so the comparison means something
        assert base_out.outputs[0].token_ids[:3] == base_tokens[:3]
        first = ours.outputs[0].logprobs[0]
        token = ours.outputs[0].token_ids[0]
        assert first[token].logprob == pytest.approx(float(rows[0][token]), abs=1e-3)


def test_many_adapters_in_one_batch_each_request_gets_what_it_gets_alone(tmp_path):
    base = make_tiny_checkpoint(tmp_path, "llama")
    adapters = []
    for i, rank in enumerate([8, 16, 8, 16]):
        make_adapter(base, tmp_path / f"a{i}", rank, SEPARATE, seed=10 + i)
        adapters.append(LoRARequest(f"a{i}", i + 1, str(tmp_path / f"a{i}")))
    # 2 adapters a step, 3 kept on the host (the fourth is read again), a 24-token budget (prompts
    # are chunked) and 12 KV blocks (some requests are preempted); prefix caching is on, and the
    # same prompt runs under several adapters, which must not share its KV.
    llm = LLM(str(base), enable_lora=True, max_loras=2, max_cpu_loras=3, max_lora_rank=16, max_num_seqs=6,
              max_num_batched_tokens=24, kv_cache_memory=12 * 8192, max_model_len=128)
    prompts = [[5, 9, 2, 7, 11, 3, 8] * 4, [4, 4, 6] * 3, [12, 1, 10, 13, 2] * 6]
    jobs = [(p, adapters[i % 5] if i % 5 < 4 else None) for i, p in enumerate(prompts * 5)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    together = llm.generate([{"prompt_token_ids": p} for p, _ in jobs], params, use_tqdm=False,
                            lora_request=[a for _, a in jobs])
    assert llm.engine.scheduler.num_preemptions > 0
    for (prompt, adapter), out in zip(jobs, together):
        alone = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False, lora_request=adapter)[0]
        assert out.outputs[0].token_ids == alone.outputs[0].token_ids, (prompt[:3], adapter)
    by_adapter = {a.lora_name if a else None: o.outputs[0].token_ids for (p, a), o in zip(jobs, together) if p == prompts[0]}
    assert len(set(map(tuple, by_adapter.values()))) == len(by_adapter)  # each adapter changes the output


def test_bad_adapters_are_refused_with_the_reason_and_the_engine_keeps_serving(tmp_path):
    base = make_tiny_checkpoint(tmp_path, "llama")
    other = make_tiny_checkpoint(tmp_path / "other", "llama", hidden_size=48)
    make_adapter(base, tmp_path / "good", 8, SEPARATE, seed=1)
    make_adapter(base, tmp_path / "big", 32, SEPARATE, seed=2)
    make_adapter(other, tmp_path / "foreign", 8, SEPARATE, seed=3)
    make_adapter(base, tmp_path / "saves_head", 8, ["q_proj"], seed=4)
    config = json.loads((tmp_path / "saves_head" / "adapter_config.json").read_text())
    config["modules_to_save"] = ["lm_head"]
    (tmp_path / "saves_head" / "adapter_config.json").write_text(json.dumps(config))
    llm = LLM(str(base), enable_lora=True, max_lora_rank=16, kv_cache_memory="8MiB", max_model_len=128)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    cases = [("missing", tmp_path / "nowhere", r"adapter_config.json not found"),
             ("big", tmp_path / "big", r"rank 32, above --max-lora-rank 16: raise --max-lora-rank to at least 32"),
             ("foreign", tmp_path / "foreign", r"trained for another base model"),
             ("saves_head", tmp_path / "saves_head", r"modules_to_save \['lm_head'\].*not supported")]
    for i, (name, path, message) in enumerate(cases, start=2):
        with pytest.raises(ValueError, match=message):
            llm.generate([PROMPTS[0]], params, use_tqdm=False, lora_request=LoRARequest(name, i, str(path)))
    good = LoRARequest("good", 1, str(tmp_path / "good"))
    assert len(llm.generate([PROMPTS[0]], params, use_tqdm=False, lora_request=good)[0].outputs[0].token_ids) == 4
    with pytest.raises(ValueError, match="LoRA id 1 already names"):
        llm.generate([PROMPTS[0]], params, use_tqdm=False, lora_request=LoRARequest("again", 1, str(tmp_path / "big")))
    plain = LLM(str(base), kv_cache_memory="8MiB", max_model_len=128)
    with pytest.raises(ValueError, match="LoRA is not enabled: start the engine with --enable-lora"):
        plain.generate([PROMPTS[0]], params, use_tqdm=False, lora_request=good)
