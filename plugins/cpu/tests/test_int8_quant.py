"""``--quantization int8`` on the CPU: the rounding, the product, and generation on the embedded
model against HF transformers running the same int8 weights dequantized to float32."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import transformers

from runtime import LLM
from runtime_cpu.quant import CpuInt8Method, Int8Weight

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tests"))
from hf_reference import (assert_greedy_matches, embedded_greedy_and_chat, embedded_hf_model,  # noqa: E402
                          hf_greedy)


def _weight(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Rows of very different magnitudes, each with one outlier, as real projections have."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=generator) * 10 ** (torch.rand(rows, 1, generator=generator) * 4 - 2)
    weight[torch.arange(rows), torch.randint(0, cols, (rows,), generator=generator)] *= 10
    return weight


def _dequantized(stored: Int8Weight) -> torch.Tensor:
    return stored.qweight.double() * stored.scales.double()[:, None]


def test_quantize_rounds_each_channel_to_within_half_a_step():
    weight = _weight(96, 320, seed=0)
    stored = CpuInt8Method().quantize(weight)
    assert stored.qweight.dtype == torch.int8 and stored.qweight.shape == weight.shape
    assert int(stored.qweight.abs().max()) <= 127
    step = weight.double().abs().amax(dim=1) / 127
    torch.testing.assert_close(stored.scales.double(), step, rtol=1e-6, atol=0)
    error = (_dequantized(stored) - weight.double()).abs().amax(dim=1)
    assert bool((error <= step / 2 * (1 + 1e-5)).all()), (error / step).max()
    # Each channel's largest value is exact: it sets the scale.
    assert bool((stored.qweight.abs().amax(dim=1) == 127).all())


def test_all_zero_channel_stays_zero():
    weight = _weight(8, 64, seed=1)
    weight[3] = 0
    stored = CpuInt8Method().quantize(weight)
    out = CpuInt8Method().apply(stored, torch.randn(2, 64))
    assert bool((out[:, 3] == 0).all()) and bool(torch.isfinite(out).all())


@pytest.mark.parametrize("kernel", ["fbgemm", "weight_only"])
@pytest.mark.parametrize("rows", [1, 5, 64])
def test_apply_matches_float64_product_of_the_int8_weight(kernel, rows):
    method = CpuInt8Method()
    weight = _weight(192, 576, seed=2)
    stored = method.quantize(weight)
    if kernel == "weight_only":
        stored = Int8Weight(stored.qweight, stored.scales, None)
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(rows, 576, generator=generator)
    x[:, 7] *= 40  # an outlier feature, as hidden states have
    bias = torch.randn(192, generator=generator)
    dense = _dequantized(stored)
    expected = x.double() @ dense.T + bias.double()
    got = method.apply(stored, x, bias)
    assert got.dtype == torch.float32 and got.shape == (rows, 192)
    # The fbgemm path rounds each activation to 1/15876 of its row's largest magnitude (the
    # two-part split); both paths accumulate in float32.
    magnitude = x.double().abs() @ dense.abs().T
    allowed = x.double().abs().amax(dim=1, keepdim=True) * dense.abs().sum(dim=1) / 15876 + 1e-6 * magnitude + 1e-6
    error = (got.double() - expected).abs()
    assert bool((error <= allowed).all()), f"worst error / allowed {(error / allowed).max().item():.3g}"


def test_apply_keeps_leading_dimensions_and_dtype():
    method = CpuInt8Method()
    weight = _weight(48, 64, seed=4)
    stored = method.quantize(weight)
    x = torch.randn(2, 3, 64).bfloat16()
    got = method.apply(stored, x)
    assert got.dtype == torch.bfloat16 and got.shape == (2, 3, 48)
    expected = x.double().reshape(6, 64) @ _dequantized(stored).T
    torch.testing.assert_close(got.double().reshape(6, 48), expected, rtol=1.6e-2, atol=1.6e-2 * expected.abs().max().item())


PROMPTS = ["The capital of France is", "def fibonacci(n):", "List three colors:"]
NEW_TOKENS = 12


@torch.inference_mode()
def _hf_with_int8_weights() -> transformers.PreTrainedModel:
    """HF transformers on the same GGUF, every linear weight (the output projection too, untied
    from the embedding, which stays dense) replaced by its own per-channel int8 rounding,
    computed here in float64."""
    model = embedded_hf_model()
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone(), requires_grad=False)
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            w = module.weight.double()
            step = w.abs().amax(dim=1, keepdim=True) / 127
            module.weight.copy_((torch.round(w / step).clamp(-127, 127) * step).float())
    return model


@pytest.mark.slow
@pytest.mark.xdist_group("embedded")
def test_greedy_matches_hf_running_the_same_int8_weights():
    """The embedded (Q4_1 GGUF) model requantized to int8 (``--quantization int8``, the CPU's
    default for GGUF files before their 4-bit types stayed packed)."""
    llm = LLM(None, kv_cache_memory="256MiB", max_model_len=512, quantization="int8")
    assert llm.engine.quantization == "int8"
    outputs, chat = embedded_greedy_and_chat(llm, PROMPTS, NEW_TOKENS)
    del llm
    assert "Paris" in chat, chat
    model = _hf_with_int8_weights()
    # Only a near-tie may flip: the two products differ by float32 accumulation order and
    # runtime's activation rounding (1/15876 of a row's largest value).
    for prompt, out in zip(PROMPTS, outputs):
        reference, rows = hf_greedy(model, out.prompt_token_ids, NEW_TOKENS)
        assert_greedy_matches(out.outputs[0].token_ids, reference, rows, near_tie=1e-2, context=prompt)
