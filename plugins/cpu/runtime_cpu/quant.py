"""Quantization methods of the CPU platform.

``gguf``: GGUF weights dequantized once at load, then multiplied densely. A dense matmul on
dequantized weights is what PyTorch's CPU kernels run for any checkpoint type.

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

from runtime.platform import QuantizationMethod
from runtime.platform.gguf_dequantize import GgufDequantizeMethod


class CpuGgufMethod(GgufDequantizeMethod):
    platform = "cpu"


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
