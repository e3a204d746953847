"""Decoder models as embedders, offline (``LLM(task="embed").embed``): vectors equal to HF's
pooled hidden states for a batch of mixed lengths, by the pooling the checkpoint or the flags
name; truncated dimensions; no KV blocks kept after a step; clear errors."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import transformers

from runtime import LLM, PoolingParams
from runtime.engine.args import EngineArgs
from runtime.pooling import resolve_pooler_config

from hf_reference import hf_embeddings
from tiny_models import make_tiny_checkpoint

pytestmark = pytest.mark.xdist_group("embeddings")
OPTIONS = dict(kv_cache_memory="16MiB", max_model_len=256, task="embed")
LENGTHS = (3, 40, 17, 1, 100, 64)
"""161 + 64 tokens: over two steps of the 128-token budget below, so requests wait for room."""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("embed"), "qwen2", is_matryoshka=True)


@pytest.fixture(scope="module")
def hf_model(checkpoint):
    return transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompts(hf_model):
    rng = np.random.default_rng(0)
    return [rng.integers(3, hf_model.config.vocab_size, n).tolist() for n in LENGTHS]


@pytest.fixture(scope="module")
def last_llm(checkpoint):
    """The checkpoint as it is: no sentence-transformers files, so last-token pooling, normalized."""
    return LLM(str(checkpoint), max_num_batched_tokens=128, **OPTIONS)


@pytest.fixture(scope="module")
def mean_llm(checkpoint, tmp_path_factory):
    """The same weights with sentence-transformers files asking for mean pooling, no Normalize module."""
    directory = tmp_path_factory.mktemp("st")
    for item in checkpoint.iterdir():
        os.symlink(item, directory / item.name)
    (directory / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (directory / "1_Pooling").mkdir()
    (directory / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 64, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
         "pooling_mode_max_tokens": False, "pooling_mode_lasttoken": False}))
    return LLM(str(directory), **OPTIONS)


def assert_vectors_match(outputs, expected):
    assert len(outputs) == len(expected)
    for out, ref in zip(outputs, expected):
        got = torch.tensor(out.outputs.embedding, dtype=torch.float64)
        assert got.shape == ref.shape
        cosine = float(got @ ref / (got.norm() * ref.norm()))
        assert cosine > 0.9999, cosine
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_last_token_normalized_matches_hf(last_llm, hf_model, prompts):
    outputs = last_llm.embed(prompts, use_tqdm=False)
    assert_vectors_match(outputs, hf_embeddings(hf_model, prompts, "LAST", normalize=True))
    assert [o.prompt_token_ids for o in outputs] == prompts
    assert last_llm.engine.kv_manager.usage == 0.0  # no request holds a block after its step


def test_mean_pooling_from_sentence_transformers_files(mean_llm, hf_model, prompts):
    outputs = mean_llm.embed(prompts, use_tqdm=False)
    assert_vectors_match(outputs, hf_embeddings(hf_model, prompts, "MEAN", normalize=False))
    assert mean_llm.engine.kv_manager.usage == 0.0


def test_dimensions_and_activation_per_request(last_llm, mean_llm, hf_model, prompts):
    truncated = last_llm.embed(prompts[:3], PoolingParams(dimensions=16), use_tqdm=False)
    assert_vectors_match(truncated, hf_embeddings(hf_model, prompts[:3], "LAST", normalize=True, dimensions=16))
    normalized = mean_llm.embed(prompts[:3], PoolingParams(use_activation=True), use_tqdm=False)
    assert_vectors_match(normalized, hf_embeddings(hf_model, prompts[:3], "MEAN", normalize=True))


def test_base_model_checkpoint_embeds_and_refuses_to_generate(checkpoint, hf_model, prompts, tmp_path):
    """A checkpoint without an output layer (``Qwen2Model``, as e5-mistral ships ``MistralModel``)."""
    hf_model.get_decoder().save_pretrained(tmp_path)
    for item in checkpoint.glob("*token*"):
        os.symlink(item, tmp_path / item.name)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["Qwen2Model"]
    outputs = LLM(str(tmp_path), **OPTIONS).embed(prompts[:3], use_tqdm=False)
    assert_vectors_match(outputs, hf_embeddings(hf_model, prompts[:3], "LAST", normalize=True))
    with pytest.raises(ValueError, match="Qwen2Model is a base model without an output layer.*--task embed"):
        LLM(str(tmp_path), kv_cache_memory="16MiB", max_model_len=256)


def test_prefix_cache_serves_last_token_but_not_mean(last_llm, mean_llm, prompts):
    for llm, expect_hits in ((last_llm, True), (mean_llm, False)):
        kv = llm.engine.kv_manager
        first = llm.embed([prompts[4]], use_tqdm=False)[0].outputs.embedding
        hits = kv.prefix_cache_hits
        again = llm.embed([prompts[4]], use_tqdm=False)[0].outputs.embedding
        assert (kv.prefix_cache_hits > hits) == expect_hits
        np.testing.assert_allclose(again, first, rtol=1e-5, atol=1e-6)


def test_errors_name_the_cause(last_llm, mean_llm, prompts):
    with pytest.raises(ValueError, match="prompt 1: input has 129 tokens.*at most 128"):
        last_llm.embed([prompts[0], [5] * 129], use_tqdm=False)
    assert not last_llm.engine.has_unfinished_requests()  # the first prompt was not left queued
    with pytest.raises(ValueError, match="dimensions must be between 1 and the model's 64"):
        last_llm.embed(prompts[0], PoolingParams(dimensions=65), use_tqdm=False)
    with pytest.raises(ValueError, match="runs --task embed"):
        last_llm.generate(prompts[0], use_tqdm=False)


def test_pooler_config_sources(checkpoint, hf_model):
    plain = transformers.AutoConfig.from_pretrained(checkpoint)
    plain.is_matryoshka = False
    config = resolve_pooler_config(checkpoint, plain, '{"seq_pooling_type": "cls", "use_activation": false}')
    assert (config.pooling_type, config.normalize, config.source) == ("CLS", False, "--pooler-config")
    with pytest.raises(ValueError, match="does not support truncated embeddings"):
        config.spec(PoolingParams(dimensions=8))
    plain.matryoshka_dimensions = [16, 32]
    with pytest.raises(ValueError, match="dimensions 8 is not one this model was trained for: 16, 32"):
        resolve_pooler_config(checkpoint, plain).spec(PoolingParams(dimensions=8))
    with pytest.raises(ValueError, match="pooling_type 'max' is not one of LAST, MEAN, CLS"):
        resolve_pooler_config(checkpoint, plain, {"pooling_type": "max"})


def test_task_flags():
    assert EngineArgs(runner="pooling").task == "embed"
    with pytest.raises(ValueError, match="runner generate contradicts task embed"):
        EngineArgs(task="embed", runner="generate")
    with pytest.raises(ValueError, match="pooler_config is for embedding models"):
        EngineArgs(pooler_config='{"pooling_type": "MEAN"}')
    with pytest.raises(ValueError, match="--pooler-config is not JSON"):
        EngineArgs(task="embed", pooler_config="{pooling_type: MEAN}")
    with pytest.raises(ValueError, match="task embed does not support speculative_config"):
        EngineArgs(task="embed", speculative_config={"method": "ngram", "num_speculative_tokens": 2})
