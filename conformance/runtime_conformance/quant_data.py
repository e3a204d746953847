"""Random quantized weights, and the reference dequantization to compare a method against.

A format is checkable when the suite can write random tensors in it and knows how to read them
back: today ``gguf``, through the ``gguf`` package (llama.cpp's own numpy reference). Types the
package can quantize are quantized from random floats whose magnitude varies from block to
block, so every block has its own scale; K-quants, which it cannot quantize, are random bytes
with their float16 super-block scales set to sane values.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize, quantize

from runtime.platform import RawQuantizedTensor
from runtime.platform.packed import Fp8Data, GroupQuantData

# Byte offsets of the float16 scale fields inside one block of each K-quant (ggml-common.h).
_K_QUANT_SCALES = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}
_QUANTIZABLE = {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"}
GGUF_QTYPES = frozenset(_QUANTIZABLE | set(_K_QUANT_SCALES))


HUB_FORMATS = ("gptq", "awq", "compressed-tensors", "fp8")
HUB_QTYPES = frozenset({"int2", "int4", "int8", "fp8_e4m3"})


def unsupported_reason(fmt: str, qtype: str) -> str | None:
    if fmt in HUB_FORMATS:
        return None if qtype in HUB_QTYPES else f"the suite cannot write random {fmt} {qtype} weights"
    if fmt != "gguf":
        return f"the suite has no reference for {fmt!r} checkpoints"
    if qtype not in GGUF_QTYPES:
        return f"the suite cannot write random GGUF {qtype} tensors (it can: {', '.join(sorted(GGUF_QTYPES))})"
    return None


def random_gguf(qtype: str, rows: int, cols: int, seed: int) -> RawQuantizedTensor:
    """A random ``rows x cols`` weight stored as GGUF ``qtype``, laid out as ``GGUFReader`` gives it."""
    rng = np.random.default_rng(seed)
    kind = GGMLQuantizationType[qtype]
    if qtype in _QUANTIZABLE:
        block = GGML_QUANT_SIZES[kind][0]
        per_block = 10 ** rng.uniform(-1, 1, size=(rows, cols // block, 1))
        values = (rng.standard_normal((rows, cols // block, block)) * per_block).reshape(rows, cols).astype(np.float32)
        return RawQuantizedTensor("gguf", qtype, quantize(values, kind), (rows, cols))
    block, size = GGML_QUANT_SIZES[kind]
    data = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    for offset in _K_QUANT_SCALES[qtype]:
        scales = rng.uniform(1e-3, 1e-2, size=(rows, cols // block)).astype(np.float16)
        data[:, :, offset:offset + 2] = scales.view(np.uint8).reshape(rows, cols // block, 2)
    return RawQuantizedTensor("gguf", qtype, data.reshape(rows, -1), (rows, cols))


def random_weight(fmt: str, qtype: str, rows: int, cols: int, seed: int) -> tuple[RawQuantizedTensor, torch.Tensor]:
    """A random ``rows x cols`` weight stored as ``fmt`` ``qtype``, and its dense float64 value."""
    if fmt == "gguf":
        raw = random_gguf(qtype, rows, cols, seed)
        values = dequantize(np.asarray(raw.data), GGMLQuantizationType[raw.qtype]).reshape(raw.shape)
        return raw, torch.from_numpy(np.ascontiguousarray(values, dtype=np.float64))
    return random_hub(fmt, qtype, rows, cols, seed)


def random_hub(fmt: str, qtype: str, rows: int, cols: int, seed: int) -> tuple[RawQuantizedTensor, torch.Tensor]:
    """A GPTQ / AWQ / compressed-tensors / FP8 weight as the loader hands it over (unpacked:
    ``runtime.platform.packed``), and its float64 value by the formats' definition: integers
    ``(q - zero) * scale`` per group of 64 columns (GPTQ: act-order, groups in shuffled column
    order; AWQ: asymmetric; compressed-tensors: symmetric), FP8 ``weight * scale`` per channel."""
    generator = torch.Generator().manual_seed(seed)
    if qtype == "fp8_e4m3":
        weight = (torch.randn(rows, cols, generator=generator) * 100).to(torch.float8_e4m3fn)
        scale = 10 ** (torch.rand(rows, generator=generator) * 2 - 4)
        return (RawQuantizedTensor(fmt, qtype, Fp8Data(weight, scale), (rows, cols)),
                weight.double() * scale.double()[:, None])
    bits, group = int(qtype.removeprefix("int")), 64
    levels = 2 ** bits
    q = torch.randint(0, levels, (rows, cols), generator=generator, dtype=torch.uint8)
    scales = (10 ** (torch.rand(rows, cols // group, generator=generator) * 2 - 3)).half()
    if fmt == "compressed-tensors":
        zeros = torch.full(scales.shape, levels / 2)
    else:
        zeros = torch.randint(0, levels, scales.shape, generator=generator).float()
    g_idx = None
    groups = torch.arange(cols) // group
    if fmt == "gptq":
        g_idx = groups[torch.randperm(cols, generator=generator)].to(torch.int32)
        groups = g_idx.long()
    data = GroupQuantData(q, scales, zeros, bits, group, g_idx)
    dense = (q.double() - zeros.double()[:, groups]) * scales.double()[:, groups]
    return RawQuantizedTensor(fmt, qtype, data, (rows, cols)), dense


def random_dense(rows: int, cols: int, seed: int) -> torch.Tensor:
    """A float32 weight whose rows differ in magnitude (10^-1 to 10^1), so a per-channel scale
    differs from a per-tensor one, with one large value per row as real weights have."""
    rng = np.random.default_rng(seed)
    values = rng.standard_normal((rows, cols)) * 10 ** rng.uniform(-1, 1, size=(rows, 1))
    values[np.arange(rows), rng.integers(0, cols, size=rows)] *= 8
    return torch.from_numpy(values.astype(np.float32))
