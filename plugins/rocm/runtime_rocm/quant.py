"""Quantization methods of the ROCm platform.

``RocmGgufMethod``: GGUF weights dequantized once at load, then multiplied densely (hipBLASLt).

``RocmFp8Method`` (``--quantization fp8``): linear weights quantized at load per output channel
to the architecture's e4m3 (``float8_e4m3fnuz`` on MI300, ``float8_e4m3fn`` on MI350),
activations per token by runtime-triton's ``quantize_rows`` in the same format, and
``torch._scaled_mm`` multiplies with both scales. Where the architecture has no fp8 (or the
model is float32), the weight stays fp8 in memory and is dequantized for each product. FP8
checkpoints (``fp8_e4m3``, OCP's ``float8_e4m3fn``) load the same way: on MI300 each weight is
converted to ``float8_e4m3fnuz`` (see :func:`ocp_to_fnuz`), elsewhere kept as stored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from runtime.platform import QuantizationMethod, RawQuantizedTensor
from runtime.platform.packed import Fp8Data
from runtime.platform.gguf_dequantize import GgufDequantizeMethod

from .arch import fp8_dtype

MIN_AMAX = 1e-12


class RocmGgufMethod(GgufDequantizeMethod):
    platform = "rocm"


@dataclass
class RocmFp8Weight:
    weight: torch.Tensor
    """[out, in] in the architecture's e4m3 type (or e4m3fn where it has none: storage only)."""
    scale: torch.Tensor
    """[1, out] float32."""
    scaled_mm: bool


def quantize_weight(weight: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] -> (``dtype`` [out, in], float32 [1, out]): each row's amax maps to the format's largest value."""
    fp8_max = torch.finfo(dtype).max
    scale = weight.abs().amax(dim=1, keepdim=True).float().clamp(min=MIN_AMAX) / fp8_max
    q = weight.to(torch.float32, copy=True).div_(scale).clamp_(-fp8_max, fp8_max).to(dtype)
    return q, scale.T.contiguous()


def ocp_to_fnuz(weight: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``float8_e4m3fn`` values with their scales -> the same products in ``float8_e4m3fnuz``.

    FNUZ's exponent bias is one higher, so every bit pattern but one means half its OCP value:
    the bits are kept and the scale doubled, which is exact. The one exception is 0x80, OCP's
    negative zero and FNUZ's only NaN: it becomes zero."""
    bits = weight.view(torch.uint8)
    bits = torch.where(bits == 0x80, torch.zeros_like(bits), bits)
    return bits.view(torch.float8_e4m3fnuz), scale * 2


class RocmFp8Method(QuantizationMethod):
    name = "fp8"
    platform = "rocm"
    quantizes_dense = True
    supported_qtypes = frozenset({"fp8_e4m3"})

    def __init__(self, arch: str | None = None):
        if arch is None:
            from .plugin import platform_class

            arch = platform_class()().arch()
        self.dtype = fp8_dtype(arch)

    def precision(self, qtype: str) -> torch.dtype:
        return self.dtype or torch.float8_e4m3fn

    def quantize(self, weight: torch.Tensor) -> RocmFp8Weight:
        q, scale = quantize_weight(weight, self.dtype or torch.float8_e4m3fn)
        fast = self.dtype is not None and weight.device.type == "cuda" and weight.dtype in (torch.bfloat16, torch.float16)
        return RocmFp8Weight(q, scale, scaled_mm=fast)

    def dequantize(self, raw: RawQuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
        return raw.data.dequantize(dtype)

    def load(self, raw: RawQuantizedTensor, dtype: torch.dtype, device: torch.device) -> RocmFp8Weight:
        """An FP8 checkpoint's weight and per-channel scales, in the architecture's format. A
        static input scale is not used: activations are scaled per token (as on CUDA)."""
        data: Fp8Data = raw.data
        weight, scale = data.weight.to(device), data.scale.to(device, torch.float32)
        if self.dtype == torch.float8_e4m3fnuz:
            weight, scale = ocp_to_fnuz(weight, scale)
        fast = self.dtype is not None and device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)
        return RocmFp8Weight(weight, scale[None, :].contiguous(), scaled_mm=fast)

    def apply(self, stored: RocmFp8Weight, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if not stored.scaled_mm:
            return F.linear(x, (stored.weight.float() * stored.scale.T).to(x.dtype), bias)
        from runtime_triton.fp8 import quantize_rows

        rows = x.reshape(-1, x.shape[-1])
        x_q, x_scale = quantize_rows(rows if rows.stride(-1) == 1 else rows.contiguous(), stored.weight.dtype)
        out = torch._scaled_mm(x_q, stored.weight.T, scale_a=x_scale, scale_b=stored.scale, out_dtype=x.dtype)
        out = out if bias is None else out.add_(bias)
        return out.view(*x.shape[:-1], stored.weight.shape[0])
