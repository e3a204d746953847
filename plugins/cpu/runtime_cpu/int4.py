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

The kernel works on 4 rows at a time and dequantizes the whole weight again for each 4, so its
cost grows with the row count as fast as its one-row cost (3072x576, one thread, weights out of
cache as in a model: 0.13 ms at one row, 7.6 ms at 128, 28.6 ms at 512). From 128 rows on
(prefill chunks) ``matmul`` dequantizes the weight once, with torch ops on the packed bytes, and
multiplies in bfloat16 with oneDNN (AMX where the CPU has it): 5.7 ms at 128 rows, 7.1 ms at 512;
below 96-128 rows the dequantization costs more than the kernel saves
(benchmarks/cpu_int8_matmul.py, ``runtime-int4`` against ``int4-kernel``). On a CPU without
native bfloat16 products (neither AMX nor AVX-512 BF16: an AVX2-only AMD EPYC, say) oneDNN's
bfloat16 matmul is a slow fallback, 172 ms for 128 x 576 by 576 x 1536 against 2.1 ms in float32,
which made a 128-token prompt of the embedded model take 19 s to its first token: there the same
bfloat16 values are multiplied in float32 (``_dense_dtype``), products of bfloat16 values being
exact in float32. Both paths round the weight to bfloat16 and accumulate in float32, but not in
the same order, so a row's result depends on which path its batch took: ``deterministic`` keeps
every batch on the kernel.

On an AVX2-only CPU torch's kernel is its AVX2 build, and ``int4_avx2.c`` (compiled on first
use, native.py) takes its place below ``DENSE_MIN_ROWS`` rows: it reads the same packed bytes and
bfloat16 scales, rounds the activations to int16 per group (2**-16 of the group's largest, where
the kernel rounds them to bfloat16, 2**-9) and sums nibble times activation exactly in int32
with ``vpmaddwd``, applying each group's scale and offset to the group's sums. On an AMD EPYC
(2 cores) one decode token of the embedded model spent 11.5 ms in the int4 matmuls with torch's
kernel and 6.2 ms with it (22.0 against 28.2 ms a token); at 16 rows the matmuls of a layer take
1.23 against 1.62 ms. Its rows never mix, so ``deterministic`` keeps every batch on it where it
is used.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from runtime.platform import RawQuantizedTensor
from runtime.platform.gguf_groups import group_quant
from runtime.platform.packed import GroupQuantData

from . import native

GROUP_SIZES = (32, 64, 128, 256)
# From this many rows the dequantize-then-matmul path is faster (module docstring).
DENSE_MIN_ROWS = 128
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
    """A 4-bit GPTQ/AWQ/compressed-tensors/GGUF weight (``supports_group_quant``) repacked."""
    order = None
    q, scales, zeros = data.qweight, data.scales.float(), data.zeros.float()
    if data.g_idx is not None:
        order = torch.argsort(data.g_idx.long(), stable=True)
        q = q[:, order]
    offsets = (8 - zeros) * scales
    if data.offsets is not None:
        offsets += data.offsets.float()
    return pack(q, scales, offsets, data.group_size, order)


def from_gguf(raw: RawQuantizedTensor) -> Int4Weight:
    """A GGUF Q4_0 / Q4_1 / Q4_K matrix (``raw.data``: rows of blocks) repacked, groups of 32."""
    return from_group_quant(group_quant(raw))


@functools.cache
def _nibble_layout() -> tuple[int, bool] | None:
    """How ``_convert_weight_to_int4pack_for_cpu`` lays out a full block of output columns on
    this CPU, as ``(block, halves)``: each block of ``block`` columns takes ``block / 2`` bytes
    per input column, byte ``j`` holding column ``j`` (low nibble) and ``j + block / 2`` (high)
    if ``halves``, else columns ``2j`` and ``2j + 1``. ATen picks the block by vector width
    (64 on AVX-512, 32 on AVX2 and scalar builds); found by packing a known matrix and
    checked against it. None: a layout not listed here, and every batch stays on the kernel."""
    q = torch.arange(128 * 64, dtype=torch.int32).reshape(128, 64).mul_(7).remainder_(16)
    packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
    for layout in ((64, True), (32, True), (32, False)):
        if torch.equal(_columns_by_input(packed, 128, 64, *layout).transpose(1, 2).reshape(128, 64), q.to(torch.uint8)):
            return layout
    return None


def _columns_by_input(packed: torch.Tensor, n: int, k: int, block: int, halves: bool) -> torch.Tensor:
    """The nibbles of a packed ``[n, k]`` weight (n a multiple of ``block``) as ``[n / block, k, block]``."""
    by_byte = packed.view(n // block, k, 1, block // 2) if halves else packed.view(n // block, k, block // 2, 1)
    nibbles = torch.cat([by_byte & 0x0F, by_byte >> 4], dim=2 if halves else 3)
    return nibbles.view(n // block, k, block)


def _dequantized_transposed(weight: Int4Weight, layout: tuple[int, bool]) -> torch.Tensor:
    """``W.T`` [K, N] in bfloat16: ``(q - 8) * scale + offset`` as the kernel computes it."""
    block, halves = layout
    groups, n = weight.scales_and_zeros.shape[:2]
    k = groups * weight.group_size
    nibbles = _columns_by_input(weight.packed, n, k, block, halves).view(torch.int8).sub_(8)
    by_block = (groups, n // block, block)
    scale, offset = (part.reshape(by_block).transpose(0, 1).unsqueeze(2).contiguous()
                     for part in weight.scales_and_zeros.unbind(-1))
    # One rounding to bfloat16 of the exact (q - 8) * scale + offset: addcmul computes in float.
    dense = torch.addcmul(offset, nibbles.view(n // block, groups, weight.group_size, block).to(_COMPUTE), scale)
    return dense.permute(1, 2, 0, 3).reshape(k, n)


@functools.cache
def _dense_dtype() -> torch.dtype:
    """What the dense path multiplies its bfloat16 operands in: bfloat16 where the CPU multiplies
    it natively (AMX, AVX-512 BF16), else float32 (module docstring)."""
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return torch.bfloat16 if any(getattr(torch.cpu, name, lambda: False)() for name in checks) else torch.float32


def matmul(weight: Int4Weight, x: torch.Tensor, bias: torch.Tensor | None = None,
           deterministic: bool = False) -> torch.Tensor:
    """``x @ W.T + bias`` in ``x``'s dtype, computed in bfloat16 with float32 accumulation: on
    the int4 kernel (``int4_avx2.c`` where it is preferred: finer), or from ``DENSE_MIN_ROWS``
    rows on by dequantizing the weight once (module docstring); ``deterministic`` keeps every
    batch on the kernel, so a row's result does not depend on its batch.

    A decode step makes thousands of small calls, so conversions and reshapes that would do
    nothing are skipped in Python rather than dispatched: each costs microseconds."""
    rows = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    if weight.order is not None:
        rows = rows[:, weight.order]
    block = _native_block(weight) if deterministic or rows.shape[0] < DENSE_MIN_ROWS else None
    if block is not None:
        return _finish(_native_matmul(weight, rows, block), x, bias)
    if rows.dtype != _COMPUTE:
        rows = rows.to(_COMPUTE)
    layout = None if deterministic or rows.shape[0] < DENSE_MIN_ROWS else _nibble_layout()
    if layout is not None and weight.packed.shape[0] % layout[0] == 0:
        dense = _dequantized_transposed(weight, layout)
        out = rows @ dense if _dense_dtype() == _COMPUTE else rows.to(_dense_dtype()) @ dense.to(_dense_dtype())
    else:
        out = torch._weight_int4pack_mm_for_cpu(rows, weight.packed, weight.group_size, weight.scales_and_zeros)
    return _finish(out, x, bias)


def _finish(out: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if out.dtype != x.dtype:
        out = out.to(x.dtype)
    if bias is not None:
        out = out + bias
    return out if x.dim() == 2 else out.reshape(*x.shape[:-1], out.shape[-1])


@functools.cache
def _native_preferred() -> bool:
    """Whether ``int4_avx2.c`` takes the kernel's place: where torch's kernel is AVX2 code (it was
    measured there, module docstring) and the library could be built."""
    return torch.backends.cpu.get_cpu_capability() == "AVX2" and native.library() is not None


def _native_block(weight: Int4Weight) -> int | None:
    """The packed layout's column block where ``int4_avx2.c`` multiplies this weight, else None."""
    layout = _nibble_layout()
    if layout is None or not layout[1] or layout[0] not in (32, 64) or not _native_preferred():
        return None
    return layout[0] if weight.scales_and_zeros.shape[1] % layout[0] == 0 else None


def _native_matmul(weight: Int4Weight, rows: torch.Tensor, block: int) -> torch.Tensor:
    """``rows @ W.T`` in float32 on ``int4_avx2.c``: the exact weights against the activations
    rounded to int16 per group (module docstring)."""
    if rows.dtype != torch.float32 or not rows.is_contiguous():
        rows = rows.float().contiguous()
    count, k = rows.shape
    n = weight.scales_and_zeros.shape[1]
    out = torch.empty(count, n)
    status = native.library().int4_matmul(rows.data_ptr(), weight.packed.data_ptr(), weight.scales_and_zeros.data_ptr(),
                                          out.data_ptr(), count, n, k, weight.group_size, block)
    if status != 0:
        raise MemoryError(f"int4 CPU kernel: no memory for {count} x {k // weight.group_size} group sums")
    return out
