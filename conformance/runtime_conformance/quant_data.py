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

# Byte offsets of the float16 scale fields inside one block of each K-quant (ggml-common.h).
_K_QUANT_SCALES = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}
_QUANTIZABLE = {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"}
GGUF_QTYPES = frozenset(_QUANTIZABLE | set(_K_QUANT_SCALES))


def unsupported_reason(fmt: str, qtype: str) -> str | None:
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


def reference_dequantize(raw: RawQuantizedTensor) -> torch.Tensor:
    """The dense float32 weight, by the gguf package's numpy reference."""
    values = dequantize(np.asarray(raw.data), GGMLQuantizationType[raw.qtype]).reshape(raw.shape)
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))


def random_dense(rows: int, cols: int, seed: int) -> torch.Tensor:
    """A float32 weight whose rows differ in magnitude (10^-1 to 10^1), so a per-channel scale
    differs from a per-tensor one, with one large value per row as real weights have."""
    rng = np.random.default_rng(seed)
    values = rng.standard_normal((rows, cols)) * 10 ** rng.uniform(-1, 1, size=(rows, 1))
    values[np.arange(rows), rng.integers(0, cols, size=rows)] *= 8
    return torch.from_numpy(values.astype(np.float32))
