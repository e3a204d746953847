"""Vision-language models on a GPU: tiny random LLaVA-1.5, LLaVA-NeXT (CLIP and SigLIP), Qwen2-VL and
Qwen2.5-VL generate on ``cuda`` (float32; LLaVA's decodes through CUDA graphs, Qwen's eager) the
greedy tokens HF transformers generates, for a batch mixing prompts with one and two images and a
text-only one.

Skipped without a GPU.
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import pytest
import torch

from runtime import LLM, SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

REPO_TESTS = Path(__file__).resolve().parents[3] / "tests"
NEW_TOKENS = 10


@pytest.mark.parametrize("arch", ["llava", "llava_next", "llava_next_siglip", "qwen2_vl", "qwen2_5_vl"])
def test_vision_models_match_hf_on_cuda(tmp_path, arch):
    sys.path.insert(0, str(REPO_TESTS))
    from vision_models import engine_prompts, hf_vision_greedy, make_tiny_llava, make_tiny_qwen2_vl, random_image

    if arch.startswith("llava"):
        path = make_tiny_llava(tmp_path, next_=arch.startswith("llava_next"), siglip=arch.endswith("siglip"))
        placeholder = "<image>"
    else:
        path = make_tiny_qwen2_vl(tmp_path, v2_5=arch == "qwen2_5_vl")
        placeholder = "<|vision_start|><|image_pad|><|vision_end|>"
    prompts = [(f"Look: {placeholder} what is it?", [random_image(1, 40, 30)]),
               (f"{placeholder} then {placeholder} differ", [random_image(2, 64, 50), random_image(3, 30, 44)]),
               ("The capital of France is", [])]
    llm = LLM(str(path), device="cuda", dtype="float32", max_model_len=256, kv_cache_memory="64MiB")
    outputs = llm.generate(engine_prompts(prompts), SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True),
                           use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == hf_vision_greedy(path, prompts, NEW_TOKENS)
    assert llm.engine.runner.encoder_outputs.images_encoded == 3
    del llm
    gc.collect()
    torch.cuda.empty_cache()
