"""``--load-format dummy``: a directory's config.json and tokenizer with made-up weights, loaded
through the same path as a checkpoint's; checked against HF transformers given the same weights."""

from __future__ import annotations

import shutil

import pytest
import torch
import transformers
from safetensors.torch import save_file

from runtime import LLM, SamplingParams
from runtime.loader.dummy import dummy_weights, hf_parameter_shapes
from runtime.loader.source import open_model

from hf_reference import hf_greedy
from test_models import check, make_prompts
from tiny_models import make_tiny_checkpoint

ARCHS = ["llama", "qwen2", "gemma2", "phi3", "mixtral"]
"""Plain, tied embeddings with q/k/v biases, soft-capping, fused projections, experts."""
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=2)


def config_only(path, tmp_path):
    """The checkpoint directory without its weight files."""
    target = tmp_path / f"{path.name}-config-only"
    shutil.copytree(path, target, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json"))
    return target


def hf_with_dummy_weights(directory):
    """HF's model loaded from a checkpoint of the dummy weights (float32: bf16 values are exact), so
    HF's own loading maps the names."""
    config = transformers.AutoConfig.from_pretrained(directory)
    saved = directory.parent / f"{directory.name}-hf"
    saved.mkdir()
    save_file({name: tensor.float().contiguous() for name, tensor in dummy_weights(config)}, saved / "model.safetensors")
    config.save_pretrained(saved)
    return transformers.AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32).eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_dummy_weights_load_like_a_checkpoint_of_them(arch, tmp_path):
    directory = config_only(make_tiny_checkpoint(tmp_path, arch), tmp_path)
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        open_model(directory)
    llm = LLM(str(directory), load_format="dummy", dtype="float32", kv_cache_memory="16MiB", max_model_len=256)
    prompts = make_prompts(llm.engine.runner.settings.vocab_size)[:3]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    model = hf_with_dummy_weights(directory)
    check(outputs, prompts, [hf_greedy(model, p, GREEDY.max_tokens) for p in prompts], context=arch)


def test_every_tensor_is_named_and_shaped_as_the_architecture_holds_it(tmp_path):
    path = make_tiny_checkpoint(tmp_path, "llama")
    config = transformers.AutoConfig.from_pretrained(path)
    saved = transformers.AutoModelForCausalLM.from_pretrained(path).state_dict()
    shapes = hf_parameter_shapes(config)
    assert {name: tuple(shape) for name, shape in shapes.items()} == {n: tuple(t.shape) for n, t in saved.items()}
    weights = dict((name, tensor.clone()) for name, tensor in dummy_weights(config))
    q, k = weights["model.layers.0.self_attn.q_proj.weight"], weights["model.layers.0.self_attn.k_proj.weight"]
    assert 0.015 < float(q.float().std()) < 0.025 and not torch.equal(q[0], q[1])
    assert not torch.equal(q[:k.shape[0]], k)


def test_refused_where_it_cannot_apply(tmp_path):
    with pytest.raises(ValueError, match="unknown --load-format 'pt'"):
        open_model(tmp_path, "pt")
    with pytest.raises(ValueError, match="needs a model directory"):
        open_model(None, "dummy")
    path = config_only(make_tiny_checkpoint(tmp_path, "llama"), tmp_path)
    config = (path / "config.json").read_text()
    (path / "config.json").write_text(config.rstrip().rstrip("}") + ', "quantization_config": {"quant_method": "gptq", '
                                      '"bits": 4, "group_size": 32, "desc_act": false, "sym": true}}')
    with pytest.raises(ValueError, match="dummy makes dense weights; .* is a gptq checkpoint"):
        open_model(path, "dummy")


def test_a_vision_model_with_dummy_weights_runs_as_a_checkpoint_of_them(tmp_path):
    from vision_models import make_tiny_llava, random_image

    directory = config_only(make_tiny_llava(tmp_path / "llava", next_=True), tmp_path)
    saved = tmp_path / "saved"
    shutil.copytree(directory, saved)
    config = transformers.AutoConfig.from_pretrained(directory)
    save_file({name: tensor.contiguous() for name, tensor in dummy_weights(config)}, saved / "model.safetensors")
    request = {"prompt": "USER: <image> describe ASSISTANT:", "multi_modal_data": {"image": random_image(0, 40, 30)}}
    runs = []
    for path, load_format in ((directory, "dummy"), (saved, "auto")):
        llm = LLM(str(path), load_format=load_format, dtype="float32", kv_cache_memory="16MiB", max_model_len=512)
        completion = llm.generate(request, GREEDY, use_tqdm=False)[0].outputs[0]
        runs.append((completion.token_ids, [entry[token].logprob for token, entry in zip(completion.token_ids,
                                                                                          completion.logprobs)]))
    assert runs[0] == runs[1]


def test_served_with_dummy_weights_as_the_offline_engine(tmp_path):
    """``runtime serve --load-format dummy`` on a directory without weights: the API processes read
    its tokenizer without asking for weight files, and a completion equals the offline engine's."""
    import httpx

    from api_server import TINY_ARGS, ServerProcess

    directory = config_only(make_tiny_checkpoint(tmp_path, "llama"), tmp_path)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    llm = LLM(str(directory), load_format="dummy", dtype="float32", kv_cache_memory="16MiB", max_model_len=256)
    expected = llm.generate(["hello world"], params, use_tqdm=False)[0].outputs[0].text
    server = ServerProcess(str(directory), "--load-format", "dummy", "--dtype", "float32", *TINY_ARGS).start()
    try:
        reply = httpx.post(f"{server.base_url}/completions", timeout=60, json={
            "model": "tiny", "prompt": "hello world", "max_tokens": 6, "temperature": 0, "ignore_eos": True})
    finally:
        server.stop()
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["text"] == expected
