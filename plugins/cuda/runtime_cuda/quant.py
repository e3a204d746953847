"""Quantization methods of the CUDA platform.

``CudaGgufMethod``: GGUF's integer block types stay packed and run the same W4A16 / W8A16 Triton
GEMM as GPTQ (runtime_triton.wna16), repacked at load (``runtime.platform.gguf_groups``): Q4_0,
Q4_1, Q4_K, Q2_K and Q3_K as 4-bit values, Q5_0, Q5_1, Q5_K, Q6_K and Q8_0 as 8-bit ones, with
the K-quants' sub-block scales and minimums as the kernel's group scales and offsets (groups of
16 or 32). In float32 models the 8-bit-stored types are dequantized instead: their float32 scales
and offsets for groups of 16 or 32 would make them about as large as a dense 16-bit weight.
Float types, expert stacks (the fused MoE kernel reads dense or FP8 experts) and lookups stay dense.

``gptq`` / ``awq`` / ``compressed-tensors`` 4- and 8-bit weights stay packed and run the W4A16 /
W8A16 Triton GEMM (runtime_triton.wna16); other integer weights (2-bit, unequal act-order groups) are
dequantized to the model's dtype at load. FP8
checkpoints (``fp8``, and compressed-tensors' float-quantized ones) keep their e4m3 weights and
per-channel scales and run ``Fp8Method``'s scaled matmul, activations scaled per token.

``Fp8Method`` (``--quantization fp8``): a dense checkpoint's linear weights quantized at load to
float8 e4m3 with one float32 scale per output channel; activations quantized per token at run
time; ``torch._scaled_mm`` multiplies on the FP8 tensor cores (compute capability 8.9+). Where
that matmul cannot run, the weight stays FP8 in memory and is dequantized for each product, and
a warning says so once per reason.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from runtime.platform import QuantizationMethod, RawQuantizedTensor
from runtime.platform.gguf_dequantize import GgufDequantizeMethod
from runtime.platform.gguf_groups import GGUF_GROUP_TYPES, group_quant
from runtime.platform.packed import Fp8Data

logger = logging.getLogger(__name__)

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)
# The smallest amax a scale is taken from (weight rows here, activation rows in runtime_triton.fp8): an
# all-zero row gets a tiny positive scale and zeros instead of a division by zero.
MIN_AMAX = 1e-12
# _scaled_mm needs K and N to be multiples of 16 (cuBLASLt's 16-byte alignment of FP8 rows).
SCALED_MM_ALIGN = 16


class CudaGgufMethod(GgufDequantizeMethod):
    """GGUF tensors: integer block types packed on the WNA16 GEMM, the rest dense."""

    platform = "cuda"
    supported_qtypes = GgufDequantizeMethod.supported_qtypes | {"Q5_0", "Q5_1", "Q2_K", "Q3_K"}

    def load(self, raw: RawQuantizedTensor, dtype: torch.dtype, device: torch.device):
        bits, _ = GGUF_GROUP_TYPES.get(raw.qtype, (None, None))
        if bits is None or len(raw.shape) != 2 or (bits == 8 and dtype == torch.float32):
            return self.dequantize(raw, dtype).to(device)
        from runtime_triton import wna16

        return wna16.repack(group_quant(raw), dtype, device)  # rows of whole blocks: K is whole words

    def apply(self, weight, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return apply_loaded(weight, x, bias)


@dataclass
class Fp8Weight:
    """A linear weight as ``Fp8Method`` keeps it: ``weight * scale.T`` approximates the original."""

    weight: torch.Tensor
    """[out, in] float8_e4m3fn, row-major (its transpose is the column-major operand _scaled_mm needs)."""
    scale: torch.Tensor
    """[1, out] float32: each output channel's amax / 448."""
    scaled_mm: bool
    """Whether ``apply`` multiplies in FP8 (``torch._scaled_mm``) or dequantizes the weight first."""


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] -> (e4m3 [out, in], float32 scales [1, out]): each row's amax maps to 448."""
    # One float32 copy of the weight at a time, divided in place: an 8B model's largest weight
    # (gate_up, 28672 x 4096) is 470 MB in float32.
    scale = weight.abs().amax(dim=1, keepdim=True).float().clamp(min=MIN_AMAX) / FP8_MAX
    q = weight.to(torch.float32, copy=True).div_(scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale.T.contiguous()


def dequantize_weight(stored: Fp8Weight, dtype: torch.dtype) -> torch.Tensor:
    return (stored.weight.float() * stored.scale.T).to(dtype)


class Fp8Method(QuantizationMethod):
    """Online FP8: per-output-channel e4m3 weights, dynamic per-token e4m3 activations.

    Per-channel and per-token scales (rather than one scale per tensor, vLLM's default for
    ``--quantization fp8``) keep an outlier channel or token from flattening the others into
    e4m3's few mantissa bits, and need no extra pass: the row-wise scaled matmul applies both
    scales in its epilogue, and a token's scale comes from the pass that casts it
    (benchmarks/fp8_linear.py times row-wise against per-tensor scaling).
    """

    name = "fp8"
    platform = "cuda"
    quantizes_dense = True
    supported_qtypes = frozenset({"fp8_e4m3"})

    def __init__(self):
        self._warned: set[str] = set()

    def quantize(self, weight: torch.Tensor) -> Fp8Weight:
        q, scale = quantize_weight(weight)
        reason = self._fallback_reason(weight)
        self._warn(reason)
        return Fp8Weight(q, scale, scaled_mm=reason is None)

    def _warn(self, reason: str | None) -> None:
        if reason is not None and reason not in self._warned:
            self._warned.add(reason)
            logger.warning("fp8: %s, so those weights are kept in FP8 but dequantized for every matmul "
                           "(memory saved, no FP8 speed-up)", reason)

    @staticmethod
    def _fallback_reason(weight: torch.Tensor) -> str | None:
        """Why ``torch._scaled_mm`` cannot multiply this weight, or None when it can."""
        if weight.device.type != "cuda":
            return f"weights on {weight.device.type}, not a CUDA device"
        major, minor = torch.cuda.get_device_capability(weight.device)
        if (major, minor) < (8, 9):
            return (f"{torch.cuda.get_device_name(weight.device)} (compute capability {major}.{minor}) has no FP8 "
                    f"tensor cores (8.9+: Ada, Hopper, Blackwell)")
        if weight.dtype not in (torch.bfloat16, torch.float16):
            return (f"the model runs in {str(weight.dtype).removeprefix('torch.')} and the FP8 matmul writes "
                    f"bfloat16 or float16 (use --dtype bfloat16 for FP8 speed)")
        out_features, in_features = weight.shape
        if out_features % SCALED_MM_ALIGN or in_features % SCALED_MM_ALIGN:
            return f"a [{out_features}, {in_features}] weight is not a multiple of {SCALED_MM_ALIGN} in both dimensions"
        return None

    def quantize_experts(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[E, out, in] -> (e4m3 [E, out, in], float32 scales [E, out]): the per-output-channel
        scheme of :meth:`quantize`, one expert at a time (a float32 copy of one expert, not of the
        whole stack). ``fused_moe`` reads the e4m3 weights and applies the scales to its products:
        weight-only FP8, which halves the bytes a memory-bound decode step reads."""
        q = torch.empty(weight.shape, dtype=FP8_DTYPE, device=weight.device)
        scales = torch.empty(weight.shape[:2], dtype=torch.float32, device=weight.device)
        for expert in range(weight.shape[0]):
            q[expert], scale = quantize_weight(weight[expert])
            scales[expert] = scale[0]
        return q, scales

    def precision(self, qtype: str) -> torch.dtype:
        return FP8_DTYPE  # activations are rounded to e4m3 per token

    def dequantize(self, raw: RawQuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
        return raw.data.dequantize(dtype)

    def load(self, raw: RawQuantizedTensor, dtype: torch.dtype, device: torch.device) -> Fp8Weight:
        """An FP8 checkpoint's weight as stored, its scales per output channel. A static input
        scale is not used: activations are scaled per token, which covers a calibrated scale's range."""
        data: Fp8Data = raw.data
        weight = data.weight.to(device)
        reason = self._fallback_reason(torch.empty(weight.shape, dtype=dtype, device=device))
        self._warn(reason)
        return Fp8Weight(weight, data.scale.to(device, torch.float32)[None, :].contiguous(), scaled_mm=reason is None)

    def apply(self, stored: Fp8Weight, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if not stored.scaled_mm:
            return F.linear(x, dequantize_weight(stored, x.dtype), bias)
        rows = x.reshape(-1, x.shape[-1])
        return scaled_mm(rows, stored, bias).view(*x.shape[:-1], stored.weight.shape[0])


def scaled_mm(x: torch.Tensor, stored: Fp8Weight, bias: torch.Tensor | None) -> torch.Tensor:
    """``x`` [M, K] @ W.T + bias on the FP8 tensor cores, ``x`` quantized per row on the way in.

    The row-wise scaled matmul writes bfloat16 on every torch build (float16 output came later,
    and only for some GPUs and cuBLAS versions), so a float16 model gets the bfloat16 result
    cast back and adds its bias itself: _scaled_mm's bias must be bfloat16 with bfloat16 output.
    """
    from runtime_triton.fp8 import quantize_rows

    x_q, x_scale = quantize_rows(x if x.stride(-1) == 1 else x.contiguous(), FP8_DTYPE)
    fused_bias = bias if x.dtype == torch.bfloat16 else None
    out = torch._scaled_mm(x_q, stored.weight.T, scale_a=x_scale, scale_b=stored.scale, bias=fused_bias,
                           out_dtype=torch.bfloat16)
    if x.dtype == torch.bfloat16:
        return out
    out = out.to(x.dtype)
    return out if bias is None else out.add_(bias)


class CudaGroupQuantMethod(QuantizationMethod):
    """GPTQ / AWQ / compressed-tensors integer weights on the WNA16 GEMM (the rest dequantized
    at load); compressed-tensors' FP8 weights through ``Fp8Method``."""

    platform = "cuda"
    supported_qtypes = frozenset({"int2", "int4", "int8"})

    def dequantize(self, raw: RawQuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
        return raw.data.dequantize(dtype)

    def precision(self, qtype: str) -> torch.dtype | None:
        return FP8_DTYPE if qtype == "fp8_e4m3" else None

    def load(self, raw: RawQuantizedTensor, dtype: torch.dtype, device: torch.device):
        if isinstance(raw.data, Fp8Data):
            return Fp8Method().load(raw, dtype, device)
        from runtime_triton import wna16

        if wna16.supports(raw.data):
            return wna16.repack(raw.data, dtype, device)
        return self.dequantize(raw, dtype).to(device)

    def apply(self, weight, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return apply_loaded(weight, x, bias)


def apply_loaded(weight, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ W.T + bias`` for what a checkpoint method's ``load`` kept: FP8, dense, or WNA16."""
    if isinstance(weight, Fp8Weight):
        return Fp8Method().apply(weight, x, bias)
    if isinstance(weight, torch.Tensor):
        return F.linear(x, weight, bias)
    from runtime_triton import wna16

    return wna16.matmul(weight, x, bias)


class CudaGptqMethod(CudaGroupQuantMethod):
    name = "gptq"


class CudaAwqMethod(CudaGroupQuantMethod):
    name = "awq"


class CudaCompressedTensorsMethod(CudaGroupQuantMethod):
    name = "compressed-tensors"
    supported_qtypes = CudaGroupQuantMethod.supported_qtypes | {"fp8_e4m3"}
