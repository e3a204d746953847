"""Mixture-of-experts models generate what HF transformers generates from the same checkpoint
(greedy tokens equal, logprobs close), also under chunked prefill and preemption; their parameter
count is known before loading; unsupported combinations fail naming the fix."""

from __future__ import annotations

import pytest
import torch
import transformers

from runtime import LLM, SamplingParams
from runtime.models import decoder_settings

from hf_reference import assert_greedy_matches, hf_greedy
from test_models import MAX_NEW, make_prompts
from tiny_models import MOE_ARCHITECTURES, make_tiny_checkpoint

GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=2)
# The second schedule prefills in 8-token chunks with KV for one max-length sequence and little
# more (BLOCKS blocks of 4 tokens), so requests are also preempted and recomputed.
SCHEDULES = {"default": dict(), "chunked_prefill_and_preemption": dict(max_num_batched_tokens=8, block_size=4)}
BLOCKS = 18


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-moe")
    return {arch: make_tiny_checkpoint(root, arch) for arch in MOE_ARCHITECTURES}


@pytest.mark.parametrize("arch", MOE_ARCHITECTURES)
def test_greedy_matches_hf_under_every_schedule(arch, checkpoints):
    path = checkpoints[arch]
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = make_prompts(model.config.vocab_size, seed=7)
    refs = [hf_greedy(model, p, MAX_NEW) for p in prompts]
    for schedule, options in SCHEDULES.items():
        options = dict(dict(dtype="float32", kv_cache_memory="16MiB", max_model_len=64), **options)
        if schedule != "default":  # layers x K/V x block x KV heads x head_dim x float32
            c = model.config
            options["kv_cache_memory"] = BLOCKS * c.num_hidden_layers * 2 * 4 * c.num_key_value_heads * c.head_dim * 4
        llm = LLM(str(path), **options)
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
        for out, (ref_tokens, ref_rows) in zip(outputs, refs):
            completion = out.outputs[0]
            assert_greedy_matches(completion.token_ids, ref_tokens, ref_rows, context=f"{arch}/{schedule}")
            for step, (token, entry) in enumerate(zip(completion.token_ids, completion.logprobs)):
                if token != ref_tokens[step]:
                    break
                assert abs(entry[token].logprob - float(ref_rows[step][token])) < 1e-3, f"{arch}/{schedule} step {step}"
        if schedule != "default":
            assert llm.engine.scheduler.num_preemptions > 0, "the tiny cache should have forced preemption"


@pytest.mark.parametrize("arch", MOE_ARCHITECTURES)
def test_parameter_count_known_before_loading(arch, checkpoints):
    config = transformers.AutoConfig.from_pretrained(checkpoints[arch])
    model = transformers.AutoModelForCausalLM.from_config(config)
    assert decoder_settings(config).num_parameters() == sum(p.numel() for p in model.parameters())


def test_sparse_layers_follow_decoder_sparse_step_and_mlp_only_layers():
    config = transformers.Qwen3MoeConfig(num_hidden_layers=6, decoder_sparse_step=2, mlp_only_layers=[3], num_experts=4,
                                         num_experts_per_tok=2)
    model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
        **dict(config.to_dict(), hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_attention_heads=2,
               num_key_value_heads=1, head_dim=16, vocab_size=50)))
    expected = [type(layer.mlp).__name__.endswith("SparseMoeBlock") for layer in model.model.layers]
    assert decoder_settings(config).moe.sparse_layers == expected == [False, True, False, False, False, True]


def test_lora_on_an_moe_model_is_refused(checkpoints):
    with pytest.raises(ValueError, match="LoRA adapters on mixture-of-experts models are not supported"):
        LLM(str(checkpoints["mixtral"]), enable_lora=True)


def test_expert_parallel_needs_experts_that_split(checkpoints, tmp_path):
    from runtime.models.parallel import check_expert_split

    moe = decoder_settings(transformers.AutoConfig.from_pretrained(checkpoints["qwen2_moe"])).moe
    check_expert_split(2, moe, expert_parallel=True)
    with pytest.raises(ValueError, match="8 experts do not split evenly across --tensor-parallel-size 3"):
        check_expert_split(3, moe, expert_parallel=True)
    with pytest.raises(ValueError, match="intermediate size 32 does not split .* or --enable-expert-parallel"):
        check_expert_split(3, moe, expert_parallel=False)
    with pytest.raises(ValueError, match="--enable-expert-parallel needs a mixture-of-experts model"):
        check_expert_split(1, None, expert_parallel=True)


def test_a_rank_holds_a_share_of_the_experts_or_of_each_expert():
    from runtime.models.layers.moe import MoESettings, SparseMoeBlock
    from runtime.models.parallel import TensorParallel
    from runtime.platform.registry import KernelSet

    moe = MoESettings(num_experts=8, top_k=2, intermediate_size=32, renormalize=True, sparse_layers=[True],
                      shared_expert_intermediate_size=48)
    rank1 = TensorParallel(1, 2, None)
    by_expert = SparseMoeBlock(moe, 16, "silu", KernelSet([]), rank1, expert_parallel=True).experts
    assert by_expert.w13.shape == (4, 64, 16) and by_expert.w2.shape == (4, 16, 32)
    assert by_expert.expert_map.tolist() == [-1, -1, -1, -1, 0, 1, 2, 3]
    by_width = SparseMoeBlock(moe, 16, "silu", KernelSet([]), rank1).experts
    assert by_width.w13.shape == (8, 32, 16) and by_width.expert_map is None
    # A rank reads only its experts, and of each only its columns.
    gate = torch.arange(32 * 16, dtype=torch.float32).view(32, 16)
    by_expert.load("gate_proj", gate, 5)
    by_expert.load("gate_proj", gate, 2)  # another rank's: ignored
    assert torch.equal(by_expert.w13[1, :32], gate) and ("gate_proj", 1) in by_expert.loaded
    by_width.load("gate_proj", gate, 5)
    by_width.load("up_proj", gate, 5)
    assert torch.equal(by_width.w13[5], torch.cat([gate[16:], gate[16:]]))
    assert "experts.0.gate_proj" in by_width.missing() and "experts.5.up_proj" not in by_width.missing()
