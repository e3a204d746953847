"""Quantization methods of the CPU platform.

``gguf`` (the default for GGUF files), ``gptq``, ``awq``, ``compressed-tensors``: 4-bit weights
stay 4-bit (see int4.py): GGUF Q4_0, Q4_1 and Q4_K, and 4-bit GPTQ/AWQ/compressed-tensors
weights whose groups are 32, 64, 128 or 256 columns, run on PyTorch's packed int4 CPU matmul.
GGUF's other quantized types become per-channel int8 (below), as ``--quantization int8`` made
them before; other hub weights (8-bit, odd group sizes) are dequantized to the model's dtype.

``int8`` (``--quantization int8``): after loading, every linear weight (the output projection
included) becomes symmetric per-output-channel int8 with a float32 scale per row. Decoding is
memory-bound, and int8 weights are a quarter of float32's bytes. PyTorch's CPU build has no fast
kernel that multiplies int8 weights by float activations (``torch._weight_int8pack_mm`` is no
faster than float32 at one row and far slower at more; see benchmarks/cpu_int8_matmul.py), but
fbgemm's dynamic int8 linear is 2-4x faster than float32. It rounds its input to 8 bits as
well, which alone flips greedy choices of the embedded model (it stops answering "Paris"), so
``apply`` hands it each activation row split in two exactly representable parts (see
:func:`_two_part_rows`): the product is then the weight-only int8 product to about 6e-5 of the
row's largest activation.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.ao.nn.quantized.dynamic  # noqa: F401  (registers torch.ops.quantized.linear_dynamic)

from runtime.platform import QuantizationMethod, RawQuantizedTensor
from runtime.platform.gguf_dequantize import FLOAT_TYPES, GgufDequantizeMethod
from runtime.platform.packed import GroupQuantData

from . import batch_invariant, int4




@dataclass
class Int8Weight:
    """One ``[out, in]`` weight: ``qweight * scales[:, None]``. ``packed`` is fbgemm's copy of the
    same values in its own layout (None where PyTorch was built without fbgemm)."""

    qweight: torch.Tensor
    scales: torch.Tensor
    packed: Any


# fbgemm's dynamic linear quantizes its whole input to one grid of 128 uint8 steps (7 bits: with
# 8, CPUs without VNNI saturate int16 pair sums) spanning the input's minimum to maximum, zero
# included. A row holding -64 and 63 makes that grid the integers -64..63 (step 1, zero point 64,
# both exact), so integer-valued rows in that range are taken exactly.
_GRID_LOW, _GRID_HIGH = -64, 63
_TINY = torch.finfo(torch.float32).tiny


@functools.cache
def _anchor(k: int) -> torch.Tensor:
    anchor = torch.zeros(1, k)
    anchor[0, :2] = torch.tensor([_GRID_LOW, _GRID_HIGH])
    return anchor


def _two_part_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``rows`` [m, k] float32 as ``[high; low; anchor]`` [2m + 1, k] with per-row ``scale`` and
    ``low_scale`` [m, 1] such that ``rows = (high + low * low_scale) * scale``.

    ``high`` is each row rounded to integers in -63..63 after dividing by ``scale`` (the row's
    largest magnitude / 63): exact on fbgemm's grid. ``low`` is the remainder (at most half a
    step) rescaled to fill the grid; fbgemm rounds it by at most half a step, an error of
    1/(4 * 63 * 63), about 6e-5, of the row's largest magnitude.
    """
    m, k = rows.shape
    scale = torch.linalg.vector_norm(rows, ord=float("inf"), dim=1, keepdim=True).div_(_GRID_HIGH).clamp_(min=_TINY)
    units = rows / scale
    stacked = torch.cat([units.round(), units, _anchor(k)])
    low = stacked[m:2 * m].sub_(stacked[:m])
    low_scale = torch.linalg.vector_norm(low, ord=float("inf"), dim=1, keepdim=True).div_(_GRID_HIGH).clamp_(min=_TINY)
    low.div_(low_scale)
    return stacked, scale, low_scale


class CpuInt8Method(QuantizationMethod):
    name = "int8"
    platform = "cpu"
    batch_invariant = True
    quantizes_dense = True
    quantize_lm_head = True

    def quantize(self, weight: torch.Tensor) -> Int8Weight:
        weight = weight.float()
        scales = (weight.abs().amax(dim=1) / 127).clamp_(min=_TINY)
        qweight = torch.round(weight / scales[:, None]).clamp_(-127, 127).to(torch.int8)
        packed = None
        if "fbgemm" in torch.backends.quantized.supported_engines:
            with warnings.catch_warnings():
                # Quantized tensors are deprecated, but fbgemm's prepack takes nothing else; the
                # tensor only lives until it is packed.
                warnings.simplefilter("ignore", UserWarning)
                per_channel = torch._make_per_channel_quantized_tensor(
                    qweight, scales.double(), torch.zeros(len(scales), dtype=torch.long), 0)
                packed = torch.ops.quantized.linear_prepack(per_channel, None)
        return Int8Weight(qweight, scales, packed)

    def apply(self, weight: Int8Weight, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).float()
        if weight.packed is None:
            out = torch._weight_int8pack_mm(rows, weight.qweight, weight.scales)
        else:
            m = rows.shape[0]
            stacked, scale, low_scale = _two_part_rows(rows)
            both = torch.ops.quantized.linear_dynamic(stacked, weight.packed, True)
            out = torch.addcmul(both[:m], both[m:2 * m], low_scale).mul_(scale)
        if bias is not None:
            out = out + bias
        return out.to(x.dtype).reshape(*x.shape[:-1], out.shape[-1])


class CpuGgufMethod(GgufDequantizeMethod):
    """GGUF tensors: Q4_0, Q4_1 and Q4_K on the int4 kernel; other quantized types as
    per-channel int8 (the int8 method's rounding of the dequantized weight); float types dense."""

    platform = "cpu"
    batch_invariant = True
    supported_qtypes = GgufDequantizeMethod.supported_qtypes | {"Q5_0", "Q5_1", "Q2_K", "Q3_K"}

    def precision(self, qtype: str) -> torch.dtype | None:
        if qtype in int4.GGUF_INT4_TYPES:
            return torch.bfloat16
        return None if qtype in FLOAT_TYPES else torch.int8

    def load(self, raw: RawQuantizedTensor, dtype: torch.dtype, device: torch.device) -> Any:
        if raw.qtype in int4.GGUF_INT4_TYPES and len(raw.shape) == 2:
            return int4.from_gguf(raw)
        dense = self.dequantize(raw, dtype)
        if raw.qtype in FLOAT_TYPES or len(raw.shape) != 2:
            return dense
        return CpuInt8Method().quantize(dense)

    def apply(self, weight: Any, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return _apply(weight, x, bias, self.deterministic)


class CpuGroupQuantMethod(QuantizationMethod):
    """GPTQ / AWQ / compressed-tensors integer weights: 4-bit ones the int4 kernel takes stay
    packed; the others (8-bit, other group sizes) are dequantized at load. compressed-tensors'
    FP8 weights are dequantized too (the CPU has no FP8 matmul)."""

    platform = "cpu"
    batch_invariant = True
    supported_qtypes = frozenset({"int2", "int4", "int8"})

    def precision(self, qtype: str) -> torch.dtype | None:
        return torch.bfloat16 if qtype == "int4" else None

    def dequantize(self, raw: RawQuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
        return raw.data.dequantize(dtype)

    def load(self, raw: RawQuantizedTensor, dtype: torch.dtype, device: torch.device) -> Any:
        if isinstance(raw.data, GroupQuantData) and int4.supports_group_quant(raw.data):
            return int4.from_group_quant(raw.data)
        return self.dequantize(raw, dtype)

    def apply(self, weight: Any, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return _apply(weight, x, bias, self.deterministic)


class CpuGptqMethod(CpuGroupQuantMethod):
    name = "gptq"


class CpuAwqMethod(CpuGroupQuantMethod):
    name = "awq"


class CpuCompressedTensorsMethod(CpuGroupQuantMethod):
    name = "compressed-tensors"
    supported_qtypes = CpuGroupQuantMethod.supported_qtypes | {"fp8_e4m3"}


class CpuFp8CheckpointMethod(CpuGroupQuantMethod):
    """FP8 checkpoints load on the CPU dequantized to the model's dtype (no FP8 matmul here)."""

    name = "fp8"
    supported_qtypes = frozenset({"fp8_e4m3"})


def _apply(weight: Any, x: torch.Tensor, bias: torch.Tensor | None, deterministic: bool) -> torch.Tensor:
    """The product for whichever form ``load`` kept. The int8 kernel computes each row on its own
    already (the conformance suite's batch-invariance check holds it to it); int4 weights stay on
    their kernel and a dense weight takes the padded matmul under ``--deterministic``."""
    if isinstance(weight, int4.Int4Weight):
        return int4.matmul(weight, x, bias, deterministic)
    if isinstance(weight, Int8Weight):
        return CpuInt8Method().apply(weight, x, bias)
    if deterministic:
        return batch_invariant.linear(x, weight, bias)
    return torch.nn.functional.linear(x, weight, bias)
