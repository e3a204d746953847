"""Embeddings on a GPU: ``LLM(task="embed", device="cuda")`` gives HF transformers' pooled hidden
states (tiny random Qwen2, float32 and bfloat16, last-token and mean pooling, a mixed-length batch
over several steps) and captures no decode graphs. Skipped without a GPU."""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from runtime import LLM

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

REPO_TESTS = Path(__file__).resolve().parents[3] / "tests"
LENGTHS = (3, 40, 17, 1, 100, 64, 250)
MIN_COSINE = {"float32": 0.9999, "bfloat16": 0.99}
"""bfloat16 keeps 8 mantissa bits: two layers of rounding leave the vectors about 1e-3 apart."""


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("pooling", ["LAST", "MEAN"])
def test_cuda_embeddings_match_hf(tmp_path, dtype, pooling):
    sys.path.insert(0, str(REPO_TESTS))
    import transformers
    from hf_reference import hf_embeddings
    from tiny_models import make_tiny_checkpoint

    path = make_tiny_checkpoint(tmp_path, "qwen2")
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, hf.config.vocab_size, n).tolist() for n in LENGTHS]
    expected = hf_embeddings(hf, prompts, pooling, normalize=True)
    llm = LLM(str(path), device="cuda", dtype=dtype, task="embed", max_model_len=256, max_num_batched_tokens=256,
              kv_cache_memory="64MiB", pooler_config={"pooling_type": pooling})
    try:
        assert llm.engine.runner.decode_graphs is None
        outputs = llm.embed(prompts, use_tqdm=False)
        for out, ref in zip(outputs, expected):
            got = torch.tensor(out.outputs.embedding, dtype=torch.float64)
            cosine = float(got @ ref / (got.norm() * ref.norm()))
            assert cosine > MIN_COSINE[dtype], (len(out.prompt_token_ids), cosine)
        assert llm.engine.kv_manager.usage == 0.0
    finally:
        del llm
        gc.collect()
        torch.cuda.empty_cache()
