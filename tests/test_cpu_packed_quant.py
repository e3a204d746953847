"""The CPU's packed 4-bit path: GGUF 4-bit blocks repacked exactly for the int4 kernel, and the
embedded model (Q4_1) served from them by default against HF transformers on the dequantized file."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from runtime import LLM
from runtime.loader.gguf import build_config, read_weights
from runtime.loader.gguf_file import GgufFile
from runtime.platform import RawQuantizedTensor, get_registry
from runtime.worker.model_runner import ModelRunner
from runtime_conformance.tolerances import tolerance
from runtime_cpu import int4, native
from runtime_cpu.quant import CpuGgufMethod, Int8Weight

from hf_reference import assert_greedy_matches, embedded_greedy_and_chat, embedded_hf_model, hf_greedy
from tiny_models import make_tiny_gguf


def _gguf(qtype: str, rows: int, cols: int, seed: int) -> RawQuantizedTensor:
    rng = np.random.default_rng(seed)
    kind = GGMLQuantizationType[qtype]
    if qtype == "Q4_K":  # the gguf package cannot quantize K-quants: random blocks, sane float16 scales
        blocks = rng.integers(0, 256, size=(rows, cols // 256, 144), dtype=np.uint8)
        blocks[:, :, 0:4] = rng.uniform(1e-3, 1e-2, size=(rows, cols // 256, 2)).astype(np.float16).view(np.uint8)
        data = blocks.reshape(rows, -1)
    else:
        data = quantize((rng.standard_normal((rows, cols)) * 10 ** rng.uniform(-1, 1, (rows, 1))).astype(np.float32), kind)
    return RawQuantizedTensor("gguf", qtype, data, (rows, cols))


@pytest.mark.parametrize("qtype", sorted(int4.GGUF_INT4_TYPES))
def test_gguf_4bit_blocks_repack_to_the_same_weight(qtype):
    """The repacked weight, read back through the kernel on the identity, is the gguf package's
    dequantization rounded to bfloat16 (the kernel's own rounding), and stays 5 bits a weight."""
    raw = _gguf(qtype, 48, 512, seed=1)
    weight = int4.from_gguf(raw)
    reference = torch.from_numpy(dequantize(raw.data, GGMLQuantizationType[qtype]).reshape(raw.shape)).double()
    recovered = int4.matmul(weight, torch.eye(512)).T.double()
    # The kernel rounds each group's scale and offset and each weight to bfloat16 (2**-9 each):
    # within 2**-8 of the weight plus its group's largest magnitude. A wrong nibble, scale or
    # offset is off by a whole step of the group, 16 times that or more.
    group_max = reference.abs().reshape(48, -1, 32).amax(-1, keepdim=True).expand(-1, -1, 32).reshape(48, 512)
    error = (recovered - reference).abs()
    assert bool((error <= 2 ** -8 * (reference.abs() + group_max)).all()), (error / (reference.abs() + group_max)).max()
    packed_bits = 8 * sum(t.numel() * t.element_size() for t in (weight.packed, weight.scales_and_zeros)) / (48 * 512)
    assert packed_bits == 5.0


@pytest.mark.parametrize("kernel", ["torch", "native"])
@pytest.mark.parametrize("dense_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows, cols, qtype", [(192, 512, "Q4_1"), (128, 256, "Q4_K"), (96, 512, "Q4_0")])
def test_int4_product_is_the_dequantized_product_at_every_row_count(rows, cols, qtype, dense_dtype, kernel, monkeypatch):
    """Below ``DENSE_MIN_ROWS`` rows the kernel (torch's, or the compiled one that replaces it on
    AVX2-only CPUs) multiplies, from it on the weight is dequantized from the kernel's packed bytes
    and multiplied densely (192 and 128 output columns: whole blocks of the layout; 96: not, so the
    kernel stays), in bfloat16 or, on CPUs without native bfloat16 products, in float32. Every
    count gives the float64 product of the gguf package's dequantization within bfloat16 rounding;
    ``deterministic`` gives each row the one-row result at every count."""
    if kernel == "native" and not native.buildable():
        pytest.skip("no C compiler or no AVX2: the compiled kernel cannot run here")
    monkeypatch.setattr(int4, "_native_preferred", lambda: kernel == "native")
    monkeypatch.setattr(int4, "_dense_dtype", lambda: dense_dtype)
    raw = _gguf(qtype, rows, cols, seed=3)
    weight = int4.from_gguf(raw)
    reference = torch.from_numpy(dequantize(raw.data, GGMLQuantizationType[qtype]).reshape(raw.shape)).double()
    x = torch.randn(int4.DENSE_MIN_ROWS + 70, cols, generator=torch.Generator().manual_seed(4))
    alone = torch.cat([int4.matmul(weight, x[i:i + 1]) for i in range(len(x))])
    for count in (1, 5, int4.DENSE_MIN_ROWS - 1, int4.DENSE_MIN_ROWS, len(x)):
        expected = x[:count].double() @ reference.T
        # Activations, weights and the output each rounded to bfloat16 (2**-9 each) around a
        # float32 sum; a wrong nibble, scale or column order is off by a whole step or more.
        scale = x[:count].double().abs() @ reference.abs().T
        out = int4.matmul(weight, x[:count]).double()
        assert bool(((out - expected).abs() <= 2 ** -7 * scale + 1e-6).all()), ((out - expected).abs() / scale).max()
        assert torch.equal(int4.matmul(weight, x[:count], deterministic=True), alone[:count])


def test_a_tied_quantized_table_is_the_packed_output_projection(tmp_path):
    """A GGUF whose output is its (quantized) embedding table: the logits come from the method's
    packed copy of the table (int8 of Q8_0), the lookup from the exact dequantized rows."""
    path = make_tiny_gguf(tmp_path)
    reader = GgufFile(path)
    config = build_config(reader)
    config.tie_word_embeddings = True
    weights = [(name, raw) for name, raw in read_weights(reader, config) if name != "lm_head.weight"]
    table = dict(weights)["model.embed_tokens.weight"]
    registry = get_registry()
    model = ModelRunner(config, iter(weights), registry.select_platform("cpu"), registry, torch.float32, 16, 128).model
    dense = torch.from_numpy(dequantize(table.data, GGMLQuantizationType.Q8_0).reshape(table.shape)).double()
    assert torch.equal(model.embed_tokens.double(), dense)
    assert isinstance(model.lm_head.quant_weight, Int8Weight)
    hidden = torch.randn(3, dense.shape[1], generator=torch.Generator().manual_seed(0))
    expected = hidden.double() @ dense.T
    # int8 per channel: half a step (1/254 of the row's largest value) per weight, summed.
    allowed = hidden.double().abs() @ dense.abs().amax(1, keepdim=True).expand_as(dense).T / 254 + 1e-5
    assert bool(((model.compute_logits(hidden).double() - expected).abs() <= allowed).all())


def test_other_gguf_types_requantize_to_int8():
    raw = _gguf("Q8_0", 16, 64, seed=2)
    stored = CpuGgufMethod().load(raw, torch.float32, torch.device("cpu"))
    assert stored.qweight.dtype == torch.int8


PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,", "List three colors:"]
NEW_TOKENS = 16


@pytest.mark.slow
@pytest.mark.xdist_group("embedded")
def test_embedded_model_is_served_from_its_4bit_blocks():
    llm = LLM(None, kv_cache_memory="256MiB", max_model_len=512)
    assert llm.engine.quantization == "gguf"
    layers = [m for m in llm.engine.runner.model.layers.modules() if getattr(m, "quant_method", None) is not None]
    assert len(layers) == 4 * 30 and all(isinstance(m.quant_weight, int4.Int4Weight) for m in layers)
    bits = 8 * sum(m.stored_bytes for m in layers) / sum(m.in_features * m.out_features for m in layers)
    assert bits == 5.0  # Q4_1: 4-bit values, a scale and an offset per 32
    # The tied output projection multiplies the Q8_0 table as int8; the lookup keeps it dense.
    assert isinstance(llm.engine.runner.model.lm_head.quant_weight, Int8Weight)
    outputs, chat = embedded_greedy_and_chat(llm, PROMPTS, NEW_TOKENS)
    del llm
    assert "Paris" in chat, chat
    hf = embedded_hf_model()
    # The int4 kernel computes in bfloat16, and the tied output projection is int8: a near-tie is
    # what the conformance suite allows bfloat16.
    for prompt, out in zip(PROMPTS, outputs):
        tokens, rows = hf_greedy(hf, out.prompt_token_ids, NEW_TOKENS)
        assert_greedy_matches(out.outputs[0].token_ids, tokens, rows, near_tie=tolerance(torch.bfloat16).logprob,
                              context=prompt)
