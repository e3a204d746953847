"""MoE models from GGUF files in llama.cpp's layout (experts stacked per projection in 3-D Q8_0
tensors, ``blk.N.ffn_gate_exps`` etc.): the config read from the metadata, and the model computing
what HF transformers computes from the same (dequantized) weights."""

from __future__ import annotations

import pytest
import torch
import transformers

from runtime.loader.gguf import build_config, read_weights
from runtime.loader.gguf_file import GgufFile
from runtime.models import decoder_settings
from runtime.platform import get_registry
from runtime.worker.model_runner import ModelRunner

from test_tensor_parallel import PROMPTS, prefill_step
from tiny_models import make_tiny_moe_gguf


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_gguf_moe_computes_what_hf_does(arch, tmp_path):
    path, config, state = make_tiny_moe_gguf(tmp_path, arch)
    reader = GgufFile(path)
    read = build_config(reader)
    assert type(read) is type(config)
    assert decoder_settings(read).moe == decoder_settings(config).moe
    registry = get_registry()
    runner = ModelRunner(read, read_weights(reader, read), registry.select_platform("cpu"), registry, torch.float32,
                         16, 128)
    runner.prepare_inputs(256, 8, 128)
    runner.allocate_kv_cache(32)
    out = runner.execute(prefill_step())
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.load_state_dict(state)
    for i, prompt in enumerate(PROMPTS):
        with torch.inference_mode():
            expected = model(torch.tensor([prompt])).logits[0, -1].log_softmax(-1)
        [(ids, values, _)] = out.logprobs[f"r{i}"]
        assert out.sampled[f"r{i}"] == [int(expected.argmax())]
        assert values == pytest.approx(expected[ids].tolist(), abs=1e-4)
