"""``Fp8Method`` (``--quantization fp8``): weight quantization, the activation kernel, the scaled
matmul, the dequantizing fallback, and the method inside a model.

References are independent of the code under test: e4m3 rounding is a nearest-value search in a
table of every e4m3 value built from the format's definition (not torch's cast), and products
are float64 matmuls.

Without a GPU: the weight quantization and fallback run in torch; the activation kernel runs
under Triton's interpreter on rows whose scaled values are exact e4m3 values, because the
interpreter's float32 -> e4m3 conversion misrounds (126.1 becomes 64: the mantissa carry is lost,
seen with triton 3.7), so only exact conversions can be checked there; the scaled matmul runs on the
CPU's ``torch._scaled_mm`` where this torch has one. With a GPU the kernel's rounding is checked
on random rows and ``apply`` against float64 within a bound derived from e4m3's precision.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch

from runtime_cuda.quant import Fp8Method, Fp8Weight, dequantize_weight, quantize_weight, scaled_mm

HAS_GPU = torch.cuda.is_available()
gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
E4M3_MAX = 448.0
# e4m3's relative rounding error: 3 mantissa bits, so at most half a step of 2^-3.
E4M3_REL = 2.0 ** -4


def e4m3_values() -> torch.Tensor:
    """Every finite e4m3fn value in float64, from the format: bias 7, subnormals at exponent field 0,
    and exponent field 15 with mantissa 7 reserved for NaN."""
    magnitudes = [m / 8 * 2.0 ** -6 for m in range(8)]
    magnitudes += [(1 + m / 8) * 2.0 ** (e - 7) for e in range(1, 16) for m in range(8) if (e, m) != (15, 7)]
    mags = torch.tensor(magnitudes, dtype=torch.float64)
    return torch.cat([-mags.flip(0), mags[1:]])


def round_e4m3(v: torch.Tensor) -> torch.Tensor:
    """Nearest e4m3 value of each element (float64); inputs must lie within +-448."""
    table = e4m3_values()
    v = v.double().contiguous()
    upper = torch.searchsorted(table, v).clamp(1, len(table) - 1)
    below, above = table[upper - 1], table[upper]
    return torch.where(v - below <= above - v, below, above)


def test_quantize_weight_matches_the_format():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 80, generator=g, dtype=torch.float64) * (10 ** (torch.rand(48, 1, generator=g) * 4 - 2))
    w[5] = 0  # an all-zero row gets zeros, not NaN
    w = w.float()
    original = w.clone()
    q, scale = quantize_weight(w)
    assert torch.equal(w, original), "quantize_weight changed its input"
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    assert scale.dtype == torch.float32 and scale.shape == (1, 48)
    amax = original.double().abs().amax(dim=1)
    torch.testing.assert_close(scale[0].double(), amax.clamp(min=1e-12) / E4M3_MAX, rtol=1e-6, atol=0)
    expected = round_e4m3(original.double() / scale.T.double())
    assert torch.equal(q.double(), expected)
    assert q.double().abs().amax(dim=1)[amax > 0].eq(E4M3_MAX).all(), "each row's amax maps to 448"


def test_stored_weight_is_a_byte_per_element_and_a_scale_per_channel():
    from runtime.models.layers.linear import _tensor_bytes

    stored = Fp8Method().quantize(torch.randn(96, 64, dtype=torch.bfloat16))
    assert _tensor_bytes(stored) == 96 * 64 + 96 * 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fallback_applies_the_dequantized_weight_and_says_so(dtype, caplog):
    g = torch.Generator().manual_seed(1)
    w, x, bias = (torch.randn(*s, generator=g).to(dtype) for s in ((40, 24), (3, 5, 24), (40,)))
    method = Fp8Method()
    with caplog.at_level(logging.WARNING, logger="runtime_cuda.quant"):
        stored = method.quantize(w)
        method.quantize(w)
    assert not stored.scaled_mm
    assert [r.getMessage() for r in caplog.records if "fp8" in r.getMessage()] == [
        "fp8: weights on cpu, not a CUDA device, so those weights are kept in FP8 but dequantized for every "
        "matmul (memory saved, no FP8 speed-up)"]
    y = method.apply(stored, x, bias)
    assert y.dtype == dtype and y.shape == (3, 5, 40)
    reference = x.double() @ w.double().T + bias.double()
    _assert_within_fp8_bound(y, reference, x, w, rounded_operands=1, out_dtype=dtype)


def _assert_within_fp8_bound(y, reference, x, w, rounded_operands: int, out_dtype: torch.dtype) -> None:
    """|y - x @ W.T| within 7 standard deviations of the e4m3 rounding error, plus the output's rounding.

    Each product x_k * w_k picks up a relative error delta_x + delta_w from its rounded operands;
    one operand's delta is at most 2^-4 and, uniform over half a rounding step, has variance at
    most (2^-4)^2 / 3. Over K independent terms the error of one output has variance at most
    rounded_operands * (2^-4)^2 / 3 * sum_k (x_k w_k)^2, near-Gaussian by the CLT: 7 sigma leaves
    about 1e-12 of false alarms per element. The output is rounded once more to its dtype.
    """
    xs, ws = x.double().reshape(-1, 1, x.shape[-1]), w.double().unsqueeze(0)
    sigma = torch.sqrt(rounded_operands * E4M3_REL ** 2 / 3 * ((xs * ws) ** 2).sum(-1)).reshape(reference.shape)
    out_rel = {torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}[out_dtype]
    bound = 7 * sigma + out_rel * reference.abs() + 1e-6
    excess = ((y.double().cpu() - reference.cpu()).abs() - bound.cpu()).max()
    assert excess <= 0, f"error exceeds the e4m3 bound by {excess.item():.3g}"


def _exact_rows(g: torch.Generator, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of e4m3 values times a power of two per row, each holding +-448 times its power: the
    kernel's scale is then that power exactly and every scaled value is an e4m3 value."""
    table = e4m3_values()
    q = table[torch.randint(len(table), (rows, cols), generator=g)]
    q[torch.arange(rows), torch.randint(cols, (rows,), generator=g)] = E4M3_MAX * torch.randn(rows, generator=g).sign().double()
    powers = 2.0 ** torch.randint(-12, 4, (rows, 1), generator=g).double()
    return q * powers, powers


@pytest.mark.parametrize("cols", [64, 200])
def test_quantize_rows_on_exact_values(cols, device):
    from runtime_triton.fp8 import quantize_rows

    g = torch.Generator().manual_seed(2)
    x, powers = _exact_rows(g, 7, cols)
    x[3], powers[3] = 0, 1e-12 / E4M3_MAX
    # A strided view, as a slice of a wider activation is.
    wide = torch.zeros(7, cols + 16, dtype=torch.bfloat16)
    wide[:, 8:8 + cols] = x.to(torch.bfloat16)
    q, scale = quantize_rows(wide.to(device)[:, 8:8 + cols])
    assert q.dtype == torch.float8_e4m3fn and q.shape == (7, cols) and q.is_contiguous()
    assert scale.dtype == torch.float32 and scale.shape == (7, 1)
    torch.testing.assert_close(scale.cpu().double(), powers, rtol=1e-6, atol=0)
    assert torch.equal(q.cpu().double(), x / powers)
    empty_q, empty_scale = quantize_rows(torch.empty(0, cols, device=device, dtype=torch.bfloat16))
    assert empty_q.shape == (0, cols) and empty_scale.shape == (0, 1)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_quantize_rows_rounds_to_nearest(dtype):
    from runtime_triton.fp8 import quantize_rows

    g = torch.Generator().manual_seed(3)
    x = (torch.randn(300, 4096, generator=g) * (10 ** (torch.rand(300, 1, generator=g) * 4 - 2))).to(dtype)
    q, scale = quantize_rows(x.cuda())
    amax = x.double().abs().amax(dim=1, keepdim=True)
    torch.testing.assert_close(scale.cpu().double(), amax / E4M3_MAX, rtol=2.0 ** -23, atol=0)
    exact = x.double() / scale.cpu().double()
    got, expected = q.cpu().double(), round_e4m3(exact)
    # A quotient within float32 rounding of a midpoint between two e4m3 values may go either way.
    table = e4m3_values()
    step = (table[1:] - table[:-1]).max()
    differ = got != expected
    assert (got - expected).abs().max() <= step
    near_midpoint = ((exact - expected).abs() - (exact - got).abs()).abs() <= 1e-5 * exact.abs()
    assert not (differ & ~near_midpoint).any(), f"{int(differ.sum())} values not rounded to nearest"


def _scaled_mm_runs(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.get_device_capability() >= (8, 9)
    a = torch.zeros(16, 16, dtype=torch.float8_e4m3fn)
    try:
        torch._scaled_mm(a, a.T, scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError):
        return False
    return True


@pytest.mark.parametrize("dtype,bias", [(torch.bfloat16, False), (torch.bfloat16, True), (torch.float16, True)])
@pytest.mark.parametrize("rows", [1, 5, 48])
def test_scaled_mm_of_exact_activations(rows, dtype, bias, device):
    """Activations that quantize exactly leave only the output's rounding between the FP8 matmul
    and float64 on the dequantized weight: a check of the scales' orientation and the bias."""
    if not _scaled_mm_runs(device):
        pytest.skip(f"torch._scaled_mm does not run on this {device.type} device")
    g = torch.Generator().manual_seed(4)
    x, _ = _exact_rows(g, rows, 64)
    w = torch.randn(96, 64, generator=g).to(dtype)
    b = torch.randn(96, generator=g).to(dtype) if bias else None
    q, scale = quantize_weight(w.to(device))
    stored = Fp8Weight(q, scale, scaled_mm=True)
    y = scaled_mm(x.to(dtype).to(device), stored, None if b is None else b.to(device))
    assert y.dtype == dtype and y.shape == (rows, 96)
    w_deq = dequantize_weight(stored, torch.float64).cpu()
    reference = x @ w_deq.T + (b.double() if bias else 0)
    # Errors scale with the terms' magnitude |x| @ |w|, not with the result, where terms cancel:
    # Hopper's FP8 tensor cores accumulate with about 14 mantissa bits (seen on the H100: 2^-14.2),
    # and a float16 model adds its bias after the product was rounded to bfloat16 (2^-9 of |x @ w|;
    # seen: 2^-8.4 with the float16 rounding on top). A wrong scale or orientation is off by O(1).
    magnitude = x.abs() @ w_deq.abs().T
    error = (y.cpu().double() - reference).abs()
    assert (error <= 2.0 ** -7 * reference.abs() + 2.0 ** -8 * magnitude).all(), float((error / magnitude).max())


@gpu
@pytest.mark.parametrize("dtype,bias", [(torch.bfloat16, True), (torch.bfloat16, False), (torch.float16, True)])
@pytest.mark.parametrize("rows,cols,out", [(1, 4096, 1024), (5, 64, 128), (64, 1024, 6144), (300, 4096, 256)])
def test_apply_matches_float64(rows, cols, out, dtype, bias):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(rows, cols, generator=g).to(dtype)
    w = (torch.randn(out, cols, generator=g) * (10 ** (torch.rand(out, 1, generator=g) - 0.5))).to(dtype)
    b = torch.randn(out, generator=g).to(dtype) if bias else None
    method = Fp8Method()
    stored = method.quantize(w.cuda())
    if torch.cuda.get_device_capability() < (8, 9):
        assert not stored.scaled_mm
        pytest.skip("no FP8 tensor cores: the fallback is checked on the CPU")
    assert stored.scaled_mm
    y = method.apply(stored, x.cuda().view(1, rows, cols), None if b is None else b.cuda())
    assert y.dtype == dtype and y.shape == (1, rows, out)
    reference = x.double() @ w.double().T + (b.double() if bias else 0)
    _assert_within_fp8_bound(y.view(rows, out), reference, x, w, rounded_operands=2, out_dtype=torch.bfloat16)


@gpu
def test_unsupported_weights_fall_back_with_a_reason(caplog):
    method = Fp8Method()
    with caplog.at_level(logging.WARNING, logger="runtime_cuda.quant"):
        odd = method.quantize(torch.randn(64, 40, device="cuda", dtype=torch.bfloat16))
        full = method.quantize(torch.randn(64, 64, device="cuda", dtype=torch.float32))
    assert not odd.scaled_mm and not full.scaled_mm
    messages = " | ".join(r.getMessage() for r in caplog.records)
    if torch.cuda.get_device_capability() >= (8, 9):
        assert "[64, 40] weight is not a multiple of 16" in messages
        assert "--dtype bfloat16" in messages
    else:
        assert "no FP8 tensor cores" in messages
    x = torch.randn(3, 40, device="cuda", dtype=torch.bfloat16)
    w = dequantize_weight(odd, torch.float64).cpu()
    torch.testing.assert_close(method.apply(odd, x).double().cpu(), x.double().cpu() @ w.T, rtol=2.0 ** -7,
                               atol=2.0 ** -7 * (x.double().cpu().abs() @ w.abs().T).max().item())


def test_quantize_weights_in_a_model_halves_linear_weight_bytes(tmp_path):
    """The engine's --quantization step with this method (on the CPU its fallback path): every
    linear weight but the output projection stored as one byte per element plus a scale per row,
    and the model still computes what the dense one does within the e4m3 error."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tests"))
    from tiny_models import make_tiny_checkpoint

    from runtime import LLM, SamplingParams
    from runtime.models.layers.linear import Linear

    path = make_tiny_checkpoint(tmp_path, "llama", tie_word_embeddings=False)
    llm = LLM(str(path), device="cpu", dtype="bfloat16", kv_cache_memory="8MiB")
    runner = llm.engine.runner
    model = runner.model
    dense_bytes = runner.weight_bytes
    linears = [m for m in model.modules() if isinstance(m, Linear) and m is not model.lm_head]
    shapes = [tuple(m.weight.shape) for m in linears]
    params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=5)
    prompt = [[11, 42, 7, 99, 23, 5, 150]]
    [dense] = llm.generate(prompt, params, use_tqdm=False)
    model.quantize_weights(Fp8Method())
    assert all(m.quant_method is not None for m in linears) and model.lm_head.quant_method is None
    saved = sum(n * k * 2 - (n * k + 4 * n) for n, k in shapes)
    assert runner.weight_bytes == dense_bytes - saved
    [quantized] = llm.generate(prompt, params, use_tqdm=False)
    ref = dense.outputs[0].logprobs[0]
    got = quantized.outputs[0].logprobs[0]
    common = [t for t in ref if t in got]
    assert len(common) >= 3
    # Weight-only e4m3 (2.5 % rms error per weight) through two layers of this random tiny model
    # moved its top-5 first-step logprobs by 0.15 on average and 0.79 at most over 64 prompts.
    assert max(abs(got[t].logprob - ref[t].logprob) for t in common) < 1.0


@pytest.mark.parametrize("fmt", ["fp8", "compressed-tensors"])
def test_fp8_checkpoint_weights_load_as_stored(fmt):
    """An FP8 checkpoint's e4m3 weight and per-channel scales are kept as stored (no second
    rounding) and multiplied as weight * scale (here, without a GPU, by the dequantizing path)."""
    from runtime.platform import RawQuantizedTensor
    from runtime.platform.packed import Fp8Data
    from runtime_cuda.quant import CudaCompressedTensorsMethod

    generator = torch.Generator().manual_seed(7)
    weight = (torch.randn(48, 64, generator=generator) * 50).to(torch.float8_e4m3fn)
    scale = torch.rand(48, generator=generator) * 1e-3 + 1e-4
    raw = RawQuantizedTensor(fmt, "fp8_e4m3", Fp8Data(weight, scale), (48, 64))
    method = Fp8Method() if fmt == "fp8" else CudaCompressedTensorsMethod()
    stored = method.load(raw, torch.float32, torch.device("cpu"))
    assert torch.equal(stored.weight.view(torch.uint8), weight.view(torch.uint8))
    x = torch.randn(3, 64, generator=generator)
    expected = x.double() @ (weight.double() * scale.double()[:, None]).T
    torch.testing.assert_close(method.apply(stored, x).double(), expected, rtol=1e-5, atol=1e-6)
