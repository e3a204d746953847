"""4-bit weights on PyTorch's packed int4 CPU matmul (``torch._weight_int4pack_mm_for_cpu``).

The kernel multiplies by ``W[n, k] = (q[n, k] - 8) * scale[g, n] + zero[g, n]`` for groups of
32, 64, 128 or 256 input columns, reading half a byte a weight and a bfloat16 scale and offset
a group. It is vectorized for bfloat16 activations only (float32 ones take a scalar loop ~20x
slower) and rounds each dequantized weight to bfloat16 before the product, so ``apply``
computes in bfloat16 with float32 accumulation: within bfloat16's rounding of the exact
product (``precision``). Every 4-bit format is an affine map of a nibble per group, so each
repacks exactly into ``(q, scale, zero)``:

- GGUF Q4_0: ``d * (q - 8)``; Q4_1: ``d * q + m``; Q4_K: ``d * sc * q - dmin * mn`` with a 6-bit
  scale and min per 32 values of a 256-value super-block (groups of 32 throughout);
- GPTQ / AWQ / compressed-tensors: ``(q - z) * s`` per group; act-order (``g_idx``) sorts the
  input columns by group once at load, and ``apply`` gathers the activations the same way.
``torch._dyn_quant_matmul_4bit`` was measured too: on x86 its packing keeps float32 weights
(KleidiAI, its 4-bit kernel, is Arm-only), so it saves nothing here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf.quants import Q4_K

from runtime.platform import RawQuantizedTensor
from runtime.platform.packed import GroupQuantData

GROUP_SIZES = (32, 64, 128, 256)
GGUF_INT4_TYPES = frozenset({"Q4_0", "Q4_1", "Q4_K"})
_COMPUTE = torch.bfloat16


@dataclass
class Int4Weight:
    """One ``[out, in]`` weight in the int4 CPU kernel's layout."""

    packed: torch.Tensor
    """uint8, ``torch._convert_weight_to_int4pack_for_cpu``'s layout of the nibbles."""
    scales_and_zeros: torch.Tensor
    """[K / group_size, N, 2] bfloat16: each group's scale and offset."""
    group_size: int
    order: torch.Tensor | None = None
    """Input column order the weight was repacked in (act-order); None: as stored."""


def supports_group_quant(data: GroupQuantData) -> bool:
    """Whether a GPTQ/AWQ/compressed-tensors weight fits the kernel: 4 bits, a supported group
    size that divides K, and (act-order) groups of equal size."""
    k = data.qweight.shape[1]
    if data.bits != 4 or data.group_size not in GROUP_SIZES or k % data.group_size:
        return False
    if data.g_idx is None:
        return True
    counts = torch.bincount(data.g_idx.long(), minlength=k // data.group_size)
    return len(counts) == k // data.group_size and bool((counts == data.group_size).all())


def pack(q: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, group_size: int,
         order: torch.Tensor | None = None) -> Int4Weight:
    """``q`` [N, K] 0..15, ``scales`` / ``offsets`` [N, K / group_size] float: W = (q - 8) * scale + offset."""
    packed = torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
    scales_and_zeros = torch.stack([scales.T.float(), offsets.T.float()], dim=-1).to(_COMPUTE).contiguous()
    return Int4Weight(packed, scales_and_zeros, group_size, order)


def from_group_quant(data: GroupQuantData) -> Int4Weight:
    """A 4-bit GPTQ/AWQ/compressed-tensors weight (``supports_group_quant``) repacked."""
    order = None
    q, scales, zeros = data.qweight, data.scales.float(), data.zeros.float()
    if data.g_idx is not None:
        order = torch.argsort(data.g_idx.long(), stable=True)
        q = q[:, order]
    return pack(q, scales, (8 - zeros) * scales, data.group_size, order)


def from_gguf(raw: RawQuantizedTensor) -> Int4Weight:
    """A GGUF Q4_0 / Q4_1 / Q4_K matrix (``raw.data``: rows of blocks) repacked, groups of 32."""
    rows, cols = raw.shape
    blocks = np.ascontiguousarray(raw.data).view(np.uint8)
    if raw.qtype == "Q4_K":
        blocks = blocks.reshape(rows * cols // 256, 144)
        d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
        dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
        sub_scales, sub_mins = Q4_K.get_scale_min(blocks[:, 4:16].copy())
        scales = d * sub_scales.astype(np.float32)  # [blocks, 8]
        offsets = 8 * scales - dmin * sub_mins.astype(np.float32)
        # 4 runs of 32 bytes: low nibbles are sub-block 2c, high nibbles sub-block 2c + 1.
        nibbles = blocks[:, 16:].reshape(-1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    else:
        size = 18 if raw.qtype == "Q4_0" else 20
        blocks = blocks.reshape(rows * cols // 32, size)
        scales = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
        if raw.qtype == "Q4_0":
            offsets = np.zeros_like(scales)
        else:
            offsets = blocks[:, 2:4].copy().view(np.float16).astype(np.float32) + 8 * scales
        # Low nibbles are values 0-15 of the block, high nibbles 16-31.
        nibbles = blocks[:, size - 16:].reshape(-1, 1, 16) >> np.array([0, 4], dtype=np.uint8).reshape(1, 2, 1)
    q = torch.from_numpy((nibbles & 0x0F).reshape(rows, cols))
    groups = cols // 32
    return pack(q, torch.from_numpy(scales.reshape(rows, groups)), torch.from_numpy(offsets.reshape(rows, groups)), 32)


def matmul(weight: Int4Weight, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` in ``x``'s dtype, computed in bfloat16 with float32 accumulation.

    A decode step makes thousands of small calls, so conversions and reshapes that would do
    nothing are skipped in Python rather than dispatched: each costs microseconds."""
    rows = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    if weight.order is not None:
        rows = rows[:, weight.order]
    if rows.dtype != _COMPUTE:
        rows = rows.to(_COMPUTE)
    out = torch._weight_int4pack_mm_for_cpu(rows, weight.packed, weight.group_size, weight.scales_and_zeros)
    if out.dtype != x.dtype:
        out = out.to(x.dtype)
    if bias is not None:
        out = out + bias
    return out if x.dim() == 2 else out.reshape(*x.shape[:-1], out.shape[-1])
